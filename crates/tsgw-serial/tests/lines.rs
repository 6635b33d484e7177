//! Lines from a device through a real pty: every parser, bad lines, polling.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Origin, Reading, SourceKind, Target, Value};
use tsgw_serial::spawn_ports;

fn field(n: u8) -> Target {
    format!("field{n}").parse().unwrap()
}

/// Starts one port with `parser` on a fresh device and, unless it is polled
/// (which is up only once it answers), waits until it is open.
async fn start(
    name: &str,
    extra: &str,
    parser: &str,
) -> (Device, mpsc::Receiver<Reading>, Metrics, CancellationToken) {
    let device = Device::new();
    let (tx, rx) = mpsc::channel(64);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    spawn_ports(
        &[port(name, &device.path, extra, parser)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .expect("valid config");
    if !extra.starts_with("poll") {
        eventually("port open", || up(&metrics, name) == 1).await;
    }
    (device, rx, metrics, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_lines_become_readings() {
    let (mut dev, mut rx, metrics, shutdown) = start("arduino", "", KV).await;
    dev.send(b"t=21.5,h=40\r\n").await;
    let t = next_reading(&mut rx).await;
    let h = next_reading(&mut rx).await;
    assert_eq!(t.channel.get(), 100);
    assert_eq!((t.target, t.value), (field(1), Value::Number(21.5)));
    assert_eq!((h.target, h.value), (field(2), Value::Number(40.0)));
    assert_eq!(t.origin, Origin::new(SourceKind::Serial, "arduino"));
    let age = chrono::Utc::now() - t.measured_at;
    assert!(age.num_seconds().abs() < 5, "measured_at is receive time");
    eventually("accepted == 2", || accepted(&metrics, "arduino") == 2).await;
    assert_eq!(parse_errors(&metrics, "arduino", "bad_pair"), 0);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_lines_become_readings() {
    let parser = r#"format = "csv"
separator = ";"
time_column = 0
columns = { 1 = "field1", 3 = { target = "field3", scale = 0.1, offset = -1 } }"#;
    let (mut dev, mut rx, _metrics, shutdown) = start("logger", "", parser).await;
    dev.send(b"1767323045;21.5;ignored;400\n").await;
    let a = next_reading(&mut rx).await;
    let b = next_reading(&mut rx).await;
    assert_eq!((a.target, a.value), (field(1), Value::Number(21.5)));
    assert_eq!((b.target, b.value), (field(3), Value::Number(39.0)));
    assert_eq!(
        a.measured_at.timestamp(),
        1_767_323_045,
        "payload time is used"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_become_readings() {
    let parser = r#"format = "json"
fields = { "/env/temp" = "field1", "/state" = "status", "/door" = { target = "field2", channel = 7 } }"#;
    let (mut dev, mut rx, _metrics, shutdown) = start("esp", "", parser).await;
    dev.send(br#"{"env": {"temp": 19.25}, "state": "ok", "door": true}"#)
        .await;
    dev.send(b"\n").await;
    let mut got = [
        next_reading(&mut rx).await,
        next_reading(&mut rx).await,
        next_reading(&mut rx).await,
    ];
    got.sort_by_key(|r| r.target.to_string());
    assert_eq!(got[0].value, Value::Number(19.25));
    assert_eq!((got[1].target, got[1].channel.get()), (field(2), 7));
    assert_eq!(got[1].value, Value::Number(1.0));
    assert_eq!(got[2].value, Value::Text("ok".into()));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_lines_become_readings() {
    let parser = r#"format = "regex"
pattern = 'T:(?P<temp>-?[\d.]+)C H:(?P<hum>\d+)%'
fields = { temp = "field1", hum = { target = "field2", scale = 0.5 } }"#;
    let (mut dev, mut rx, metrics, shutdown) = start("dht", "", parser).await;
    dev.send(b"boot v1.2\nT:-3.5C H:80% ok\n").await;
    let mut got = [next_reading(&mut rx).await, next_reading(&mut rx).await];
    got.sort_by_key(|r| r.target.to_string());
    let [t, h] = got;
    assert_eq!((t.target, t.value), (field(1), Value::Number(-3.5)));
    assert_eq!((h.target, h.value), (field(2), Value::Number(40.0)));
    assert_eq!(
        parse_errors(&metrics, "dht", "no_match"),
        1,
        "boot banner counted"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_overlong_lines_are_counted_and_the_next_line_is_read() {
    let (mut dev, mut rx, metrics, shutdown) = start("noisy", "max_line_bytes = 32", KV).await;
    dev.send(b"garbage\n").await;
    dev.send(&[b'y'; 100]).await;
    dev.send(b"\n\xff\xfe\nx=5\n").await;
    dev.send(b"t=1,junk\n").await;
    let r = next_reading(&mut rx).await;
    assert_eq!((r.target, r.value), (field(1), Value::Number(1.0)));
    // The reading of the last line came after every earlier line was handled.
    assert_eq!(parse_errors(&metrics, "noisy", "bad_pair"), 2);
    assert_eq!(parse_errors(&metrics, "noisy", "not_utf8"), 1);
    assert_eq!(parse_errors(&metrics, "noisy", "nothing_matched"), 1);
    assert_eq!(device_errors(&metrics, "noisy", "overlong"), 1);
    // The counter is bumped right after the hand-over, so it may trail the receive.
    eventually("accepted == 1", || accepted(&metrics, "noisy") == 1).await;
    // An over-long line split over many reads without a terminator is dropped too.
    for _ in 0..20 {
        dev.send(&[b'z'; 50]).await;
    }
    dev.send(b"\nh=2\n").await;
    let r = next_reading(&mut rx).await;
    assert_eq!((r.target, r.value), (field(2), Value::Number(2.0)));
    assert_eq!(device_errors(&metrics, "noisy", "overlong"), 2);
    assert_eq!(up(&metrics, "noisy"), 1, "bad lines do not close the port");
    shutdown.cancel();
}

/// A fake polled device: answers each complete `READ\r\n` with `t=<n>` after `delay`
/// (or never, if `delay` is `None`). Returns every command byte it received.
fn polled_device(
    mut dev: Device,
    delay: Option<Duration>,
) -> tokio::task::JoinHandle<(Device, Vec<u8>)> {
    tokio::spawn(async move {
        let mut received = Vec::new();
        let mut pending = Vec::new();
        let mut buf = [0u8; 64];
        let mut n = 0;
        let stop = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < stop {
            let Ok(Ok(k)) =
                tokio::time::timeout(Duration::from_millis(100), dev.master.read(&mut buf)).await
            else {
                continue;
            };
            received.extend_from_slice(&buf[..k]);
            pending.extend_from_slice(&buf[..k]);
            while let Some(pos) = pending.windows(6).position(|w| w == b"READ\r\n") {
                pending.drain(..pos + 6);
                n += 1;
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                    dev.send(format!("t={n}\r\n").as_bytes()).await;
                }
            }
            if n >= 3 {
                break;
            }
        }
        (dev, received)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_device_answering_late_but_in_time_counts_no_timeout() {
    // Single-quoted TOML keeps the backslashes, so the crate's own escape decoding is exercised.
    // Generous slack (400 ms) between answer and timeout so a loaded CI machine cannot flake.
    let poll = r"poll = { command = 'READ\r\n', interval_ms = 600, timeout_ms = 500 }";
    let (dev, mut rx, metrics, shutdown) = start("meter", poll, KV).await;
    let device = polled_device(dev, Some(Duration::from_millis(100)));
    for expected in 1..=3 {
        let r = next_reading(&mut rx).await;
        assert_eq!(r.value, Value::Number(f64::from(expected)));
    }
    let (_dev, received) = bounded("device task", device).await.unwrap();
    assert!(
        received.starts_with(b"READ\r\nREAD\r\nREAD\r\n"),
        "{received:?}"
    );
    assert_eq!(device_errors(&metrics, "meter", "timeout"), 0);
    assert_eq!(up(&metrics, "meter"), 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_device_that_never_answers_counts_timeouts() {
    let poll = r"poll = { command = 'READ\r\n', interval_ms = 200, timeout_ms = 100 }";
    let (dev, mut rx, metrics, shutdown) = start("mute", poll, KV).await;
    let device = polled_device(dev, None);
    eventually("three poll timeouts", || {
        device_errors(&metrics, "mute", "timeout") >= 3
    })
    .await;
    assert_eq!(up(&metrics, "mute"), 0, "an unanswering device is down");
    assert!(rx.try_recv().is_err());
    let (_dev, received) = bounded("device task", device).await.unwrap();
    assert!(
        received.starts_with(b"READ\r\nREAD\r\nREAD\r\n"),
        "{received:?}"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_after_the_timeout_is_counted_but_still_used() {
    let poll = r"poll = { command = 'READ\r\n', interval_ms = 1000, timeout_ms = 100 }";
    let (dev, mut rx, metrics, shutdown) = start("slow", poll, KV).await;
    let _device = polled_device(dev, Some(Duration::from_millis(300)));
    let r = next_reading(&mut rx).await;
    assert_eq!(r.value, Value::Number(1.0));
    assert_eq!(device_errors(&metrics, "slow", "timeout"), 1);
    assert_eq!(
        up(&metrics, "slow"),
        1,
        "an answer brings the device back up"
    );
    shutdown.cancel();
}

/// Downlink commands are written by the port's task, to the open port; an
/// unknown port is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_written_to_the_open_port() {
    use tsgw_serial::{spawn_ports_with_writer, CommandError};
    let mut device = Device::new();
    let (tx, _rx) = mpsc::channel(64);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (_tasks, writer) = spawn_ports_with_writer(
        &[port("heater", &device.path, "", KV)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .expect("valid config");
    eventually("port open", || up(&metrics, "heater") == 1).await;
    let limit = Duration::from_secs(2);
    bounded(
        "command",
        writer.send("heater", b"SET 21.5\n".to_vec(), limit),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"\n") {
        let n = bounded("device read", device.master.read(&mut buf))
            .await
            .unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"SET 21.5\n");
    let e = writer.send("nope", b"x".to_vec(), limit).await.unwrap_err();
    assert_eq!(e, CommandError::UnknownPort("nope".into()));
    shutdown.cancel();
}
