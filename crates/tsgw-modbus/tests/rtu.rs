//! Modbus RTU devices sharing one serial bus, against the simulator on a pty pair.

mod sim;

use std::time::Duration;

use sim::{accepted, collect_until, errors, up, values_of, wait_for, RtuSim, Sim};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tsgw_core::Metrics;
use tsgw_modbus::{spawn_devices, ModbusDeviceConfig};

const LIMIT: Duration = Duration::from_secs(10);

/// The energy meter of the README: f32 with swapped words (CDAB) at input registers
/// 0, 6 and 12, read in one request thanks to max_gap = 4.
fn meter(name: &str, path: &str, unit: u8) -> ModbusDeviceConfig {
    toml::from_str(&format!(
        r#"
        name = "{name}"
        unit_id = {unit}
        channel = 4242
        poll_interval_ms = 100
        timeout_ms = 100
        retries = 2
        max_gap = 4

        [transport.rtu]
        path = "{path}"
        baud = 9600
        parity = "none"
        data_bits = 8
        stop_bits = 1
        inter_frame_delay_ms = 2

        [[points]]
        name = "voltage"
        kind = "input"
        address = 0
        type = "f32"
        order = "CDAB"
        target = "field1"

        [[points]]
        name = "current"
        kind = "input"
        address = 6
        type = "f32"
        order = "CDAB"
        target = "field2"

        [[points]]
        name = "power"
        kind = "input"
        address = 12
        type = "f32"
        order = "CDAB"
        scale = 0.001
        target = "field3"
        "#
    ))
    .unwrap()
}

/// f32 `v` as the two registers of a CDAB (word-swapped) meter.
fn cdab(v: f32) -> [u16; 2] {
    let bits = v.to_bits();
    [(bits & 0xFFFF) as u16, (bits >> 16) as u16]
}

fn load_meter(sim: &Sim, unit: u8, voltage: f32, current: f32, power_w: f32) {
    let mut regs = [0u16; 14];
    regs[0..2].copy_from_slice(&cdab(voltage));
    regs[6..8].copy_from_slice(&cdab(current));
    regs[12..14].copy_from_slice(&cdab(power_w));
    sim.set_input(unit, 0, &regs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_meter_does_not_stall_the_healthy_ones_on_the_bus() {
    let sim = Sim::new();
    load_meter(&sim, 1, 230.5, 4.25, 978.0);
    load_meter(&sim, 3, 229.0, 1.5, 343.5);
    // Unit 2 is on the bus in the config but never answers.
    sim.make_silent(2);
    let bus = RtuSim::start(sim.clone());
    let devices = [
        meter("meter-1", &bus.path, 1),
        meter("meter-dead", &bus.path, 2),
        meter("meter-3", &bus.path, 3),
    ];
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(&devices, tx, metrics.clone(), shutdown.clone()).unwrap();
    assert_eq!(tasks.len(), 1, "one task per serial bus");

    // Track when each healthy cycle's readings arrive, for 2 s.
    let started = Instant::now();
    let mut arrivals: Vec<(Instant, String)> = Vec::new();
    let mut got = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            arrivals.push((Instant::now(), r.origin.device.clone()));
            got.push(r);
        }
    }

    let m1 = values_of(&got, "meter-1");
    let m3 = values_of(&got, "meter-3");
    assert!(values_of(&got, "meter-dead").is_empty());
    // 100 ms interval over 2 s is 20 cycles; the dead unit may cost a few of them.
    assert!(
        m1.len() >= 3 * 8,
        "meter-1 delivered only {} readings",
        m1.len()
    );
    assert!(
        m3.len() >= 3 * 8,
        "meter-3 delivered only {} readings",
        m3.len()
    );
    for (target, value) in &m1 {
        let want = match target.as_str() {
            "field1" => 230.5,
            "field2" => 4.25,
            "field3" => 0.978,
            other => panic!("unexpected target {other}"),
        };
        assert!((value - want).abs() < 1e-6, "{target}: {value}");
    }
    assert!(m3.contains(&("field1".to_owned(), 229.0)));

    // Once the dead unit is known dead, a healthy meter never waits longer than one
    // probe of it (timeout 100 ms) plus its own interval: no gap anywhere near the
    // first cycle's timeout × (1 + retries).
    let m1_times: Vec<Instant> = arrivals
        .iter()
        .filter(|(_, d)| d == "meter-1")
        .map(|(t, _)| *t)
        .collect();
    let worst_gap = m1_times
        .windows(2)
        .skip(6) // past the first cycle, which pays for the unit's retries
        .map(|w| w[1] - w[0])
        .max()
        .unwrap();
    assert!(
        worst_gap < Duration::from_millis(600),
        "meter-1 stalled for {worst_gap:?}"
    );

    // The dead unit: first cycle 1 + 2 retries, then single probes with backoff
    // (200, 400, 800 ms): a handful of timeouts, not one per 100 ms.
    let timeouts = errors(&metrics, "meter-dead", "timeout");
    assert!((3..=8).contains(&timeouts), "{timeouts} timeouts");
    assert!(sim.requests(2) as u64 >= timeouts);
    assert_eq!(up(&metrics, "meter-dead"), 0);
    assert_eq!(up(&metrics, "meter-1"), 1);
    assert_eq!(up(&metrics, "meter-3"), 1);
    for healthy in ["meter-1", "meter-3"] {
        for kind in ["timeout", "decode", "io", "exception"] {
            assert_eq!(errors(&metrics, healthy, kind), 0, "{healthy} {kind}");
        }
    }
    // Stop the bus, then account for every reading: one request per healthy meter
    // per cycle, since the three floats come in one block read.
    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    while let Ok(r) = rx.try_recv() {
        got.push(r);
    }
    let m1_total = values_of(&got, "meter-1").len();
    assert_eq!(accepted(&metrics, "meter-1") as usize, m1_total);
    let requests = sim.requests(1);
    // The shutdown may cut the last cycle between its request and its readings.
    assert!(
        requests * 3 >= m1_total && requests * 3 <= m1_total + 3,
        "{requests} requests for {m1_total} readings"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_not_taken_for_the_next_units_answer() {
    let sim = Sim::new();
    load_meter(&sim, 1, 230.0, 1.0, 100.0);
    load_meter(&sim, 2, 400.0, 2.0, 200.0);
    // Unit 2 answers 150 ms late against a 100 ms timeout: its frames land on the
    // bus while the gateway keeps its 80 ms quiet time before the next request.
    sim.set_delay(2, Duration::from_millis(150));
    let bus = RtuSim::start(sim.clone());
    let mut devices = [
        meter("meter-1", &bus.path, 1),
        meter("meter-slow", &bus.path, 2),
    ];
    for d in &mut devices {
        d.retries = 0;
        if let tsgw_modbus::ModbusTransport::Rtu(rtu) = &mut d.transport {
            rtu.inter_frame_delay_ms = 80;
        }
    }
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(&devices, tx, metrics.clone(), shutdown.clone()).unwrap();

    wait_for(LIMIT, "three probes of the slow unit", || {
        errors(&metrics, "meter-slow", "timeout") >= 3
    })
    .await;
    let got = collect_until(&mut rx, LIMIT, |r| values_of(r, "meter-1").len() >= 6).await;
    // Every meter-1 value is meter-1's, and no exchange of meter-1 was garbled.
    assert!(values_of(&got, "meter-1").contains(&("field1".to_owned(), 230.0)));
    assert!(values_of(&got, "meter-1")
        .iter()
        .all(|(_, v)| [230.0, 1.0, 0.1].contains(v)));
    assert!(values_of(&got, "meter-slow").is_empty());
    for kind in ["decode", "timeout", "io"] {
        assert_eq!(errors(&metrics, "meter-1", kind), 0, "{kind}");
    }

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_a_bus_are_serialised_with_the_inter_frame_delay() {
    let sim = Sim::new();
    load_meter(&sim, 1, 230.0, 1.0, 100.0);
    load_meter(&sim, 2, 231.0, 2.0, 200.0);
    let bus = RtuSim::start(sim.clone());
    let mut devices = [
        meter("meter-1", &bus.path, 1),
        meter("meter-2", &bus.path, 2),
    ];
    for d in &mut devices {
        // One cycle each, three separate block reads per meter.
        d.poll_interval_ms = 60_000;
        d.max_gap = 0;
        if let tsgw_modbus::ModbusTransport::Rtu(rtu) = &mut d.transport {
            rtu.inter_frame_delay_ms = 40;
        }
    }
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(&devices, tx, metrics.clone(), shutdown.clone()).unwrap();
    collect_until(&mut rx, LIMIT, |r| r.len() >= 6).await;

    let log = sim.request_log();
    assert_eq!(log.len(), 6, "three block reads per meter");
    // Units take turns whole cycles at a time.
    let units: Vec<u8> = log.iter().map(|(_, u)| *u).collect();
    assert_eq!(units, [1, 1, 1, 2, 2, 2]);
    for pair in log.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_millis(40),
            "requests only {gap:?} apart"
        );
    }

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_comes_back_is_polled_again() {
    let sim = Sim::new();
    let bus = RtuSim::start(sim.clone());
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    // Nothing is mapped yet: the meter answers every read with an exception.
    let tasks = spawn_devices(
        &[meter("meter-1", &bus.path, 1)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    wait_for(LIMIT, "exceptions", || {
        errors(&metrics, "meter-1", "exception") >= 2
    })
    .await;
    assert_eq!(up(&metrics, "meter-1"), 1);

    load_meter(&sim, 1, 231.0, 2.0, 460.0);
    let got = collect_until(&mut rx, LIMIT, |r| r.len() >= 3).await;
    assert_eq!(got[0].value.as_f64(), Some(231.0));
    assert_eq!(got[0].channel.get(), 4242);

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_serial_port_is_retried_not_fatal() {
    let metrics = Metrics::new();
    let (tx, _rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(
        &[meter("meter-1", "/dev/tsgw-test-no-such-port", 1)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    wait_for(LIMIT, "io errors", || {
        errors(&metrics, "meter-1", "io") >= 2
    })
    .await;
    assert_eq!(up(&metrics, "meter-1"), 0);
    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
}
