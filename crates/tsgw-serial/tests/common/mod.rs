//! Test devices: pseudo-terminal pairs standing in for serial devices.
//!
//! The test holds the master side (the "device"); the port under test opens
//! the slave path, exactly as it would open `/dev/ttyUSB0`.

#![allow(dead_code)] // Not every test file uses every helper.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_serial::{SerialPort, SerialStream};
use tsgw_core::{Metrics, Reading};
use tsgw_serial::SerialPortConfig;

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct Device {
    pub master: SerialStream,
    /// Held so the slave side stays configured between the port's opens.
    pub slave: SerialStream,
    pub path: PathBuf,
}

impl Device {
    pub fn new() -> Device {
        let (master, slave) = SerialStream::pair().expect("pty pair");
        let path = PathBuf::from(slave.name().expect("slave pty has a path"));
        Device {
            master,
            slave,
            path,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).await.expect("write to pty");
        self.master.flush().await.expect("flush pty");
    }
}

/// A port config with fast reconnects, from TOML as a user would write it.
pub fn port(name: &str, path: &Path, extra: &str, parser: &str) -> SerialPortConfig {
    let text = format!(
        "name = {name:?}\npath = {path:?}\nchannel = 100\nreconnect_initial_ms = 50\n\
         reconnect_max_ms = 400\n{extra}\n[parser]\n{parser}\n",
        path = path.display().to_string()
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("test config {text}: {e}"))
}

pub const KV: &str = r#"format = "key_value"
fields = { t = "field1", h = "field2" }"#;

pub async fn next_reading(rx: &mut mpsc::Receiver<Reading>) -> Reading {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a reading within the time limit")
        .expect("readings channel open")
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `f` under the test time limit.
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub fn device_errors(m: &Metrics, name: &str, kind: &str) -> u64 {
    m.device_errors_total
        .with_label_values(&["serial", name, kind])
        .get()
}

pub fn parse_errors(m: &Metrics, name: &str, reason: &str) -> u64 {
    m.parse_errors_total
        .with_label_values(&["serial", name, reason])
        .get()
}

pub fn accepted(m: &Metrics, name: &str) -> u64 {
    m.readings_total
        .with_label_values(&["serial", name, "accepted"])
        .get()
}

pub fn up(m: &Metrics, name: &str) -> i64 {
    m.device_up.with_label_values(&["serial", name]).get()
}
