//! Modbus TCP devices against the simulator on 127.0.0.1.

mod sim;

use std::net::SocketAddr;
use std::time::Duration;

use sim::{accepted, collect_until, errors, parse_errors, up, values_of, wait_for, Sim, TcpSim};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{ChannelId, Metrics, SourceKind};
use tsgw_modbus::{spawn_devices, ModbusDeviceConfig};

const LIMIT: Duration = Duration::from_secs(10);

fn device(toml_text: &str) -> ModbusDeviceConfig {
    toml::from_str(toml_text).unwrap()
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The PLC of the README: scaled i16 holding registers plus every other table and type.
fn plc(
    name: &str,
    addr: SocketAddr,
    unit: u8,
    max_gap: u16,
    interval_ms: u64,
) -> ModbusDeviceConfig {
    device(&format!(
        r#"
        name = "{name}"
        unit_id = {unit}
        channel = 100
        poll_interval_ms = {interval_ms}
        timeout_ms = 500
        retries = 1
        max_gap = {max_gap}
        transport.tcp.address = "{addr}"

        [[points]]
        name = "count"
        kind = "holding"
        address = 0
        type = "u16"
        target = "field1"

        [[points]]
        name = "flow"
        kind = "holding"
        address = 1
        type = "f32"
        target = "field2"

        [[points]]
        name = "temperature"
        kind = "holding"
        address = 5
        type = "i16"
        scale = 0.1
        offset = -1.0
        target = "field3"

        [[points]]
        name = "energy"
        kind = "holding"
        address = 200
        type = "u64"
        order = "CDAB"
        target = "field4"
        channel = 200

        [[points]]
        name = "pressure"
        kind = "input"
        address = 0
        type = "f64"
        order = "DCBA"
        target = "field5"

        [[points]]
        name = "alarm-bit"
        kind = "holding"
        address = 6
        type = "bool"
        bit = 2
        target = "field6"

        [[points]]
        name = "pump"
        kind = "coil"
        address = 3
        type = "bool"
        target = "field7"

        [[points]]
        name = "door"
        kind = "discrete"
        address = 1
        type = "bool"
        target = "field8"
        "#
    ))
}

fn load_plc_registers(sim: &Sim, unit: u8) {
    // u16 7, f32 2.5 (0x40200000), a hole at 3..4, i16 -215, status word 0b100
    sim.set_holding(unit, 0, &[7, 0x4020, 0x0000, 0xDEAD, 0xBEEF, 0xFF29, 0b100]);
    // u64 0x0001_0002_0003_0004 with the least significant word first
    sim.set_holding(unit, 200, &[0x0004, 0x0003, 0x0002, 0x0001]);
    // f64 -1.5 = BF F8 00 .. 00, fully little-endian
    sim.set_input(unit, 0, &[0x0000, 0x0000, 0x0000, 0xF8BF]);
    sim.set_coils(unit, 0, &[false, false, false, true, false]);
    sim.set_discrete(unit, 0, &[true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_of_every_table_are_decoded_in_merged_block_reads() {
    let sim = Sim::new();
    load_plc_registers(&sim, 1);
    load_plc_registers(&sim, 2);
    let server = TcpSim::start(sim.clone(), any_port()).await;
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    // One cycle only (long interval), so request counts are exact.
    let devices = [
        plc("merged", server.addr, 1, 4, 60_000),
        plc("unmerged", server.addr, 2, 0, 60_000),
    ];
    let tasks = spawn_devices(&devices, tx, metrics.clone(), shutdown.clone()).unwrap();
    assert_eq!(
        tasks.len(),
        1,
        "two units behind one address share a connection"
    );

    let got = collect_until(&mut rx, LIMIT, |r| r.len() >= 16).await;
    let mut merged = values_of(&got, "merged");
    merged.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = [
        ("field1", 7.0),
        ("field2", 2.5),
        ("field3", -22.5),
        ("field4", 0x0001_0002_0003_0004u64 as f64),
        ("field5", -1.5),
        ("field6", 1.0),
        ("field7", 1.0),
        ("field8", 1.0),
    ];
    assert_eq!(merged.len(), expected.len(), "{merged:?}");
    for ((target, value), (want_target, want)) in merged.iter().zip(expected) {
        assert_eq!(target, want_target);
        assert!((value - want).abs() < 1e-9, "{target}: {value} != {want}");
    }
    let energy = got
        .iter()
        .find(|r| r.origin.device == "merged" && r.target.to_string() == "field4")
        .unwrap();
    assert_eq!(energy.channel, ChannelId::new(200).unwrap());
    assert_eq!(energy.origin.source, SourceKind::Modbus);
    let count = got
        .iter()
        .find(|r| r.target.to_string() == "field1")
        .unwrap();
    assert_eq!(count.channel, ChannelId::new(100).unwrap());

    // max_gap 4: holding 0..7 (bridging the 2-register hole) + holding 200..204 + input +
    // coil + discrete = 5 requests. max_gap 0: holding 0..3, 5..7, 200..204 + 3 = 6.
    assert_eq!(sim.requests(1), 5);
    assert_eq!(sim.requests(2), 6);
    assert_eq!(up(&metrics, "merged"), 1);
    // Counted once the reading is handed over, so possibly just after we got it.
    wait_for(LIMIT, "8 accepted readings", || {
        accepted(&metrics, "merged") == 8
    })
    .await;

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_and_nan_are_counted_and_the_rest_keeps_flowing() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[11]);
    // f32 NaN
    sim.set_holding(1, 10, &[0x7FC0, 0x0000]);
    sim.set_input(2, 0, &[22]);
    let server = TcpSim::start(sim.clone(), any_port()).await;
    let addr = server.addr;
    let flaky = device(&format!(
        r#"
        name = "flaky"
        unit_id = 1
        channel = 1
        poll_interval_ms = 50
        timeout_ms = 500
        transport.tcp.address = "{addr}"
        points = [
            {{ kind = "holding", address = 0, type = "u16", target = "field1" }},
            {{ name = "unmapped", kind = "holding", address = 50, type = "u16", target = "field2" }},
            {{ kind = "holding", address = 10, type = "f32", target = "field3" }},
        ]
        "#
    ));
    let healthy = device(&format!(
        r#"
        name = "healthy"
        unit_id = 2
        channel = 2
        poll_interval_ms = 50
        timeout_ms = 500
        transport.tcp.address = "{addr}"
        points = [{{ kind = "input", address = 0, type = "u16", target = "field1" }}]
        "#
    ));
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(&[flaky, healthy], tx, metrics.clone(), shutdown.clone()).unwrap();

    let got = collect_until(&mut rx, LIMIT, |r| {
        values_of(r, "flaky").len() >= 3 && values_of(r, "healthy").len() >= 3
    })
    .await;
    // Only the mapped register of the flaky device produces readings.
    assert!(values_of(&got, "flaky")
        .iter()
        .all(|v| *v == ("field1".to_owned(), 11.0)));
    assert!(values_of(&got, "healthy")
        .iter()
        .all(|v| *v == ("field1".to_owned(), 22.0)));
    wait_for(LIMIT, "3 exceptions", || {
        errors(&metrics, "flaky", "exception") >= 3
    })
    .await;
    assert!(parse_errors(&metrics, "flaky", "not_finite") >= 3);
    // An exception is an answer: the device is up, nothing was a timeout or disconnect.
    assert_eq!(up(&metrics, "flaky"), 1);
    assert_eq!(errors(&metrics, "flaky", "timeout"), 0);
    assert_eq!(errors(&metrics, "flaky", "disconnect"), 0);
    assert_eq!(errors(&metrics, "healthy", "exception"), 0);
    assert!(metrics
        .render()
        .contains(r#"tsgw_device_errors_total{device="flaky",kind="exception",source="modbus"}"#));

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}

fn counter_device(addr: SocketAddr) -> ModbusDeviceConfig {
    device(&format!(
        r#"
        name = "plc"
        unit_id = 1
        channel = 9
        poll_interval_ms = 50
        timeout_ms = 300
        retries = 1
        transport.tcp.address = "{addr}"
        points = [{{ kind = "holding", address = 0, type = "u16", target = "field1" }}]
        "#
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_plc_is_ridden_out() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[1]);
    let server = TcpSim::start(sim, any_port()).await;
    let addr = server.addr;
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(
        &[counter_device(addr)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    collect_until(&mut rx, LIMIT, |r| r.len() >= 2).await;
    assert_eq!(up(&metrics, "plc"), 1);

    // The PLC reboots: its connections drop and the port refuses for a while.
    server.stop().await;
    wait_for(LIMIT, "the device marked down", || up(&metrics, "plc") == 0).await;
    wait_for(LIMIT, "a refused reconnect", || {
        errors(&metrics, "plc", "io") >= 1
    })
    .await;
    assert!(errors(&metrics, "plc", "disconnect") >= 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    while rx.try_recv().is_ok() {}

    // Back on the same port with a new value: readings resume by themselves.
    let sim = Sim::new();
    sim.set_holding(1, 0, &[2]);
    let server = TcpSim::start(sim, addr).await;
    collect_until(&mut rx, LIMIT, |r| {
        r.iter().any(|r| r.value.as_f64() == Some(2.0))
    })
    .await;
    assert_eq!(up(&metrics, "plc"), 1);

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_does_not_wait_for_a_device_that_is_down() {
    // A port with nothing listening (bound, read, released).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(
        &[counter_device(addr)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    wait_for(LIMIT, "refused connects counted", || {
        errors(&metrics, "plc", "io") >= 2
    })
    .await;
    assert_eq!(up(&metrics, "plc"), 0);

    let sim = Sim::new();
    sim.set_holding(1, 0, &[5]);
    let server = TcpSim::start(sim, addr).await;
    let got = collect_until(&mut rx, LIMIT, |r| !r.is_empty()).await;
    assert_eq!(got[0].value.as_f64(), Some(5.0));

    // Cancelling stops the task promptly even while it waits.
    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_stops_quietly_when_the_readings_channel_closes() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[1]);
    let server = TcpSim::start(sim, any_port()).await;
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let tasks = spawn_devices(
        &[counter_device(server.addr)],
        tx,
        Metrics::new(),
        CancellationToken::new(),
    )
    .unwrap();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}

#[tokio::test]
async fn config_errors_fail_startup_and_name_the_culprit() {
    let mut bad = counter_device("127.0.0.1:502".parse().unwrap());
    bad.points[0].address = 65535;
    bad.points[0].data_type = tsgw_modbus::DataType::F32;
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn_devices(&[bad], tx, Metrics::new(), CancellationToken::new()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("\"plc\"") && msg.contains("holding register 65535"),
        "{msg}"
    );
}

/// A peer that answers every read with one register too few (a valid frame with
/// the request's transaction id), or with bytes that are not Modbus at all.
async fn broken_peer(garbage: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = [0u8; 12];
                while conn.read_exact(&mut request).await.is_ok() {
                    let answer: Vec<u8> = if garbage {
                        // A frame-shaped answer whose protocol id is not Modbus.
                        vec![0x12, 0x34, 0xAB, 0xCD, 0, 3, 1, 0x83, 0x99]
                    } else {
                        // MBAP: transaction id, protocol 0, length 5, unit; PDU: fc 3, 2 bytes, 0x0007
                        vec![request[0], request[1], 0, 0, 0, 5, request[6], 3, 2, 0, 7]
                    };
                    if conn.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_are_counted_and_never_crash_the_poller() {
    for garbage in [false, true] {
        let (addr, peer) = broken_peer(garbage).await;
        let mut dev = counter_device(addr);
        dev.points[0].data_type = tsgw_modbus::DataType::F32;
        let metrics = Metrics::new();
        let (tx, mut rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let tasks = spawn_devices(&[dev], tx, metrics.clone(), shutdown.clone()).unwrap();
        wait_for(LIMIT, "decode errors", || {
            errors(&metrics, "plc", "decode") >= 2
        })
        .await;
        assert!(rx.try_recv().is_err(), "no reading from a malformed answer");
        assert_eq!(up(&metrics, "plc"), 0, "garbage={garbage}");
        shutdown.cancel();
        for t in tasks {
            // Ok(()) rather than a JoinError: the task did not panic.
            tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
        }
        peer.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_a_gateway_cannot_reach_is_down_and_backed_off() {
    let sim = Sim::new();
    sim.set_holding(1, 0, &[1]);
    // The gateway's unit 2 is unreachable.
    sim.set_exception(2, tokio_modbus::ExceptionCode::GatewayTargetDevice);
    let server = TcpSim::start(sim.clone(), any_port()).await;
    let healthy = counter_device(server.addr);
    let mut gone = counter_device(server.addr);
    gone.name = "behind-gateway".into();
    gone.unit_id = 2;
    let metrics = Metrics::new();
    let (tx, mut rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let tasks = spawn_devices(&[healthy, gone], tx, metrics.clone(), shutdown.clone()).unwrap();

    // 50 ms interval for ~1 s: ~20 polls of the healthy unit, but the unreachable one
    // backs off (100, 200, 400, 800 ms) instead of being asked every 50 ms.
    let got = collect_until(&mut rx, LIMIT, |r| values_of(r, "plc").len() >= 15).await;
    assert!(values_of(&got, "behind-gateway").is_empty());
    let exceptions = errors(&metrics, "behind-gateway", "exception");
    assert!((1..=6).contains(&exceptions), "{exceptions} exceptions");
    // (one request may be in flight while we look)
    let asked = sim.requests(2) as u64;
    assert!(
        asked == exceptions || asked == exceptions + 1,
        "{asked} vs {exceptions}"
    );
    assert_eq!(up(&metrics, "behind-gateway"), 0);
    assert_eq!(up(&metrics, "plc"), 1);

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}

/// Downlink writes go through the bus: holding registers (encoded like reads)
/// and a coil, each read back; a refused write names the exception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_through_the_bus_and_are_read_back() {
    use tsgw_modbus::{
        encode_value, spawn_devices_with_writer, DataType, WordOrder, WriteError, WriteValue,
    };
    let sim = Sim::new();
    load_plc_registers(&sim, 1);
    let server = TcpSim::start(sim.clone(), any_port()).await;
    let metrics = Metrics::new();
    let (tx, _rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let devices = [plc("plc", server.addr, 1, 4, 200)];
    let (tasks, writer) =
        spawn_devices_with_writer(&devices, tx, metrics.clone(), shutdown.clone()).unwrap();

    // 21.5 °C in tenths, i16 at holding 5.
    let words = encode_value(21.5, DataType::I16, WordOrder::ABCD, 0.1, 0.0).unwrap();
    let reg = WriteValue::Registers { address: 5, words };
    tokio::time::timeout(LIMIT, writer.write("plc", reg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sim.holding(1, 5), Some(215));
    // An f32 over two registers, words swapped.
    let words = encode_value(2.5, DataType::F32, WordOrder::CDAB, 1.0, 0.0).unwrap();
    let two = WriteValue::Registers { address: 1, words };
    writer.write("plc", two).await.unwrap();
    assert_eq!(
        (sim.holding(1, 1), sim.holding(1, 2)),
        (Some(0x0000), Some(0x4020))
    );
    writer
        .write(
            "plc",
            WriteValue::Coil {
                address: 3,
                value: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(sim.coil(1, 3), Some(false));
    // No such coil: the PLC answers an exception, the write fails and says so.
    let e = writer
        .write(
            "plc",
            WriteValue::Coil {
                address: 999,
                value: true,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e, WriteError::Exception("IllegalFunction".into()));
    assert_eq!(errors(&metrics, "plc", "write_exception"), 1);
    // A PLC that acknowledges the write but keeps its value: the read-back says so.
    sim.protect_holding(1, 0);
    let e = writer
        .write(
            "plc",
            WriteValue::Registers {
                address: 0,
                words: vec![99],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(
        e,
        WriteError::ReadBack {
            wrote: vec![99],
            read: vec![7]
        }
    );
    assert_eq!(e.reason(), "readback_mismatch");
    assert_eq!(errors(&metrics, "plc", "write_readback_mismatch"), 1);
    let e = writer
        .write(
            "nope",
            WriteValue::Coil {
                address: 0,
                value: true,
            },
        )
        .await;
    assert_eq!(e, Err(WriteError::UnknownDevice("nope".into())));

    shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    server.stop().await;
}
