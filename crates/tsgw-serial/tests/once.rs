//! Reading a port once (`tsgw check-config --test`, `tsgw probe serial`).

mod common;

use std::time::Duration;

use common::{bounded, port, Device, KV};
use tsgw_core::Value;
use tsgw_serial::framing::Frame;
use tsgw_serial::once::{read_once, LineReader};

#[tokio::test]
async fn the_first_usable_line_becomes_readings_and_bad_lines_are_told() {
    let mut device = Device::new();
    let config = port("arduino", &device.path, "exclusive = false", KV);
    let read = tokio::spawn(async move { read_once(&config, Duration::from_secs(5)).await });
    // Give the port time to open, then a fragment (as when opening mid-line) and a good line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    device.send(b"garbage\r\nt=21.5,h=40\r\n").await;
    let report = bounded("read_once", read).await.unwrap().unwrap();
    assert_eq!(report.line.as_deref(), Some("t=21.5,h=40"));
    let values: Vec<Value> = report.readings.iter().map(|r| r.value.clone()).collect();
    assert_eq!(values, vec![Value::Number(21.5), Value::Number(40.0)]);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("garbage"),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn a_silent_device_is_reported_after_the_wait() {
    let device = Device::new();
    let config = port("quiet", &device.path, "exclusive = false", KV);
    let report = bounded("read_once", read_once(&config, Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(report.readings.is_empty());
    assert_eq!(
        report.problems,
        vec!["no usable line within 300ms".to_owned()]
    );
}

#[tokio::test]
async fn a_polled_device_gets_its_command() {
    use tokio::io::AsyncReadExt;
    let mut device = Device::new();
    let config = port(
        "meter",
        &device.path,
        "exclusive = false\npoll = { command = 'READ\\r\\n', interval_ms = 1000, timeout_ms = 900 }",
        KV,
    );
    let read = tokio::spawn(async move { read_once(&config, Duration::from_secs(5)).await });
    let mut command = [0u8; 6];
    bounded("the poll command", device.master.read_exact(&mut command))
        .await
        .unwrap();
    assert_eq!(&command, b"READ\r\n");
    device.send(b"t=1\n").await;
    let report = bounded("read_once", read).await.unwrap().unwrap();
    assert_eq!(report.readings.len(), 1);
}

#[tokio::test]
async fn lines_come_as_they_arrive() {
    let mut device = Device::new();
    let config = port("probe", &device.path, "exclusive = false", KV);
    let mut reader = LineReader::open(&config).await.unwrap();
    device.send(b"a=1\r\nb=").await;
    device.send(b"2\r\n").await;
    let first = bounded("a line", reader.next_frame()).await.unwrap();
    let second = bounded("a line", reader.next_frame()).await.unwrap();
    assert_eq!(first, Some(Frame::Line(b"a=1".to_vec())));
    assert_eq!(second, Some(Frame::Line(b"b=2".to_vec())));
}
