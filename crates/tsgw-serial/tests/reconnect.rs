//! Devices that go away, come late, or are busy; config errors; shutdown.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading, Value};
use tsgw_serial::{spawn_ports, SerialError};

/// Points `link` at `target` atomically, as udev does with `/dev/serial/by-id/...`.
fn point(link: &Path, target: &Path) {
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Sends `line` every 100 ms until a reading arrives: a port that is still
/// between opens would not see a single write.
async fn send_until_reading(
    dev: &mut Device,
    line: &[u8],
    rx: &mut mpsc::Receiver<Reading>,
) -> Reading {
    bounded("a reading from a re-found device", async {
        loop {
            dev.send(line).await;
            if let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                return r;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_device_is_reopened_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("usb-Arduino_Uno-if00");
    let mut dev = Device::new();
    point(&link, &dev.path);

    let (tx, mut rx) = mpsc::channel(64);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let tasks = spawn_ports(
        &[port("arduino", &link, "", KV)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    eventually("port open", || up(&metrics, "arduino") == 1).await;
    dev.send(b"t=1\n").await;
    assert_eq!(next_reading(&mut rx).await.value, Value::Number(1.0));

    // Unplug: the pty disappears, the port reads end-of-file or an error, and
    // udev removes the by-id link (which also keeps this port off pty numbers
    // that other tests reuse at once).
    drop(dev);
    std::fs::remove_file(&link).unwrap();
    eventually("device down", || up(&metrics, "arduino") == 0).await;
    let lost =
        device_errors(&metrics, "arduino", "disconnect") + device_errors(&metrics, "arduino", "io");
    assert_eq!(lost, 1, "one loss, counted once");
    // While it is gone the port retries with backoff, not in a loop.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let opens = device_errors(&metrics, "arduino", "open");
    assert!(
        (1..=6).contains(&opens),
        "{opens} open attempts in 600 ms: backoff 50, 100, 200, 400 ms expected"
    );

    // Replug: a new device node, the by-id link repointed.
    let mut dev = Device::new();
    point(&link, &dev.path);
    let r = send_until_reading(&mut dev, b"t=2\n", &mut rx).await;
    assert_eq!(r.value, Value::Number(2.0));
    assert_eq!(up(&metrics, "arduino"), 1);

    shutdown.cancel();
    for task in tasks {
        bounded("task ends on shutdown", task).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_missing_at_start_is_retried_and_other_ports_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("late-device");
    let mut present = Device::new();

    let (tx, mut rx) = mpsc::channel(64);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    spawn_ports(
        &[
            port("late", &link, "", KV),
            port("present", &present.path, "", KV),
        ],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .expect("a missing device is not a config error");

    eventually("open attempts on the missing port", || {
        device_errors(&metrics, "late", "open") >= 2
    })
    .await;
    assert_eq!(up(&metrics, "late"), 0);
    eventually("present port open", || up(&metrics, "present") == 1).await;
    present.send(b"h=50\n").await;
    let r = next_reading(&mut rx).await;
    assert_eq!(r.origin.device, "present");
    assert_eq!(r.value, Value::Number(50.0));

    let mut late = Device::new();
    point(&link, &late.path);
    let r = send_until_reading(&mut late, b"t=7\n", &mut rx).await;
    assert_eq!(r.origin.device, "late");
    assert_eq!(up(&metrics, "late"), 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_port_is_not_opened_twice() {
    let dev = Device::new();
    let (tx, _rx) = mpsc::channel(64);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    spawn_ports(
        &[port("first", &dev.path, "", KV)],
        tx.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    eventually("first open", || up(&metrics, "first") == 1).await;
    // A second gateway (here: a second spawn) must not steal or share the lines.
    spawn_ports(
        &[port("second", &dev.path, "", KV)],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    eventually("second refused", || {
        device_errors(&metrics, "second", "open") >= 1
    })
    .await;
    assert_eq!(up(&metrics, "second"), 0);
    assert_eq!(up(&metrics, "first"), 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_readings_channel_stops_the_port_quietly() {
    let mut dev = Device::new();
    let (tx, rx) = mpsc::channel(1);
    let metrics = Metrics::new();
    let tasks = spawn_ports(
        &[port("orphan", &dev.path, "", KV)],
        tx,
        metrics.clone(),
        CancellationToken::new(),
    )
    .unwrap();
    eventually("port open", || up(&metrics, "orphan") == 1).await;
    drop(rx);
    dev.send(b"t=1\n").await;
    for task in tasks {
        bounded("task ends when nobody listens", task)
            .await
            .unwrap();
    }
    assert_eq!(up(&metrics, "orphan"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_and_retrying_ports() {
    let dev = Device::new();
    let (tx, _rx) = mpsc::channel(8);
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let tasks = spawn_ports(
        &[
            port("open", &dev.path, "", KV),
            port(
                "absent",
                Path::new("/dev/serial/by-id/no-such-device"),
                "",
                KV,
            ),
        ],
        tx,
        metrics.clone(),
        shutdown.clone(),
    )
    .unwrap();
    eventually("port open", || up(&metrics, "open") == 1).await;
    shutdown.cancel();
    for task in tasks {
        bounded("task ends on shutdown", task).await.unwrap();
    }
}

#[tokio::test]
async fn bad_configs_start_nothing_and_name_the_culprit() {
    let (tx, _rx) = mpsc::channel(8);
    let metrics = Metrics::new();
    let spawn = |ports: &[tsgw_serial::SerialPortConfig]| {
        spawn_ports(ports, tx.clone(), metrics.clone(), CancellationToken::new()).map(|_| ())
    };
    let a = Path::new("/dev/ttyUSB0");
    let b = Path::new("/dev/ttyUSB1");

    let err = spawn(&[port("a", a, "", KV), port("a", b, "", KV)]).unwrap_err();
    assert_eq!(err, SerialError::DuplicateName("a".into()));

    let err = spawn(&[port("a", a, "", KV), port("b", a, "", KV)]).unwrap_err();
    assert!(err.to_string().contains("/dev/ttyUSB0"), "{err}");

    let bad_regex = "format = \"regex\"\npattern = '(?P<t>'\nfields = { t = \"field1\" }";
    let err = spawn(&[port("ok", a, "", KV), port("typo", b, "", bad_regex)]).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("\"typo\"") && text.contains("parser") && text.contains("(?P<t>"),
        "{text}"
    );

    let bad_csv = "format = \"csv\"\ncolumns = { first = \"field1\" }";
    let err = spawn(&[port("csv", a, "", bad_csv)]).unwrap_err();
    assert!(err.to_string().contains("\"first\""), "{err}");

    assert_eq!(
        metrics.device_up.with_label_values(&["serial", "ok"]).get(),
        0
    );
}
