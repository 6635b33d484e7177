//! The e2e tests' side of tsgw-testkit: the tests' gateway config (two
//! mapping rules), the tsgw binary cargo built for them, and the kit's
//! calls with a panic naming what failed (the kit returns errors).
#![allow(dead_code)] // each test uses part of it

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use rumqttc::QoS;
use thingspeak_emulator::{EmulatorHandle, Entry};
pub use tsgw_testkit::{
    channel, delivered, metric_sum, metric_value, Delivered, Device, GatewayConfig, CHANNELS,
};

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);

/// The kit's result, or a panic with its error chain.
fn ok<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}"))
}

/// The `tsgw` binary cargo built for these tests.
pub fn tsgw() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tsgw"))
}

/// Runs `tsgw <args>` to completion with `env` set: (success, stdout, stderr).
pub fn run_tsgw(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(tsgw());
    command.args(args).env_remove("RUST_LOG");
    command.envs(env.iter().copied());
    let out = command.output().expect("tsgw runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The smallest valid config (for commands that never open its queue).
pub const MINIMAL_CONFIG: &str = r#"[upstream]
client_id = "c"
username = "u"
password = "very-secret-password"
[queue]
dir = "/tmp/tsgw-never-opened"
"#;

/// `text` as gateway.toml in a new temporary folder: the folder (removed
/// when dropped) and the file's path.
pub fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path.display().to_string())
}

/// The emulator over TLS with the three test channels and the gateway's device account.
pub async fn emulator(interval: Duration) -> EmulatorHandle {
    ok(tsgw_testkit::emulator(interval).await)
}

const RULES: &str = r#"
[[mqtt.rules]]
name = "json-sensor"
topic = "sensors/+/json"
channel = 1001
parser = { format = "json", fields = { "/t" = "field1", "/h" = "field2" } }

[[mqtt.rules]]
name = "plain-sensor"
topic = "sensors/+/plain"
channel = 1001
parser = { format = "plain", target = "field3" }
"#;

/// The tests' gateway config against `emulator`: the queue in
/// `data_dir/queue`, rate limit `interval_secs`, the two sensor rules, then `extra`.
pub fn config(
    emulator: &EmulatorHandle,
    data_dir: &Path,
    interval_secs: f64,
    extra: &str,
) -> GatewayConfig {
    let mut config = ok(GatewayConfig::for_emulator(
        emulator,
        &data_dir.join("queue"),
    ));
    config.interval_secs = interval_secs;
    config.extra = format!("{RULES}{extra}");
    config
}

/// [`config`] as TOML.
pub fn config_toml(
    emulator: &EmulatorHandle,
    data_dir: &Path,
    interval_secs: f64,
    extra: &str,
) -> String {
    config(emulator, data_dir, interval_secs, extra).to_toml()
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The kit's gateway, with methods that panic instead of returning errors.
pub struct Gateway(pub tsgw_testkit::Gateway);

impl Gateway {
    pub fn start(config: &Path) -> Gateway {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Gateway {
        let mut command = tsgw_testkit::Gateway::command(tsgw(), config);
        command.envs(env.iter().copied());
        Self::start_command(command)
    }

    /// See [`tsgw_testkit::Gateway::spawn`].
    pub fn start_command(command: Command) -> Gateway {
        Gateway(ok(tsgw_testkit::Gateway::spawn(command, WAIT)))
    }

    pub fn wait_for_log(&mut self, message: &str) -> serde_json::Value {
        ok(self.0.wait_for_log(message))
    }

    pub fn signal(&self, signal: &str) {
        ok(self.0.signal(signal))
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(self) -> ExitStatus {
        ok(self.0.stop())
    }

    /// SIGKILL.
    pub fn kill(self) {
        self.0.kill()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        ok(self.0.get(path).await)
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        ok(self.0.get_with(path, headers).await)
    }

    /// Every sample of one metric family, as printed, joined by ", ".
    pub async fn metric_family(&self, name: &str) -> String {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .filter(|l| l.starts_with(name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        ok(self.0.metric(name_and_labels).await)
    }
}

impl Deref for Gateway {
    type Target = tsgw_testkit::Gateway;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A device connected to the gateway's local broker.
pub async fn device(broker: std::net::SocketAddr, id: &str) -> Device {
    ok(Device::connect(broker, id, 1000).await)
}

/// [`device`] logged in as `user` of `[mqtt.users]`.
pub async fn device_as(
    broker: std::net::SocketAddr,
    id: &str,
    user: &str,
    password: &str,
) -> Device {
    ok(Device::connect_as(broker, id, (user, password), 1000).await)
}

/// [`device`] with a persistent session: see [`Device::connect_persistent`].
pub async fn persistent_device(broker: std::net::SocketAddr, id: &str) -> Device {
    ok(Device::connect_persistent(broker, id, 1000).await)
}

/// Queues a QoS 1 publish.
pub async fn publish(device: &Device, topic: &str, payload: impl Into<Vec<u8>>) {
    ok(device.publish(topic, QoS::AtLeastOnce, payload).await)
}

/// Waits until `cond` holds on the emulator's entries, or panics with what arrived.
pub async fn wait_for_delivery(
    emulator: &EmulatorHandle,
    what: &str,
    cond: impl Fn(&Delivered) -> bool,
) {
    ok(tsgw_testkit::wait_for_delivery(emulator, what, WAIT, cond).await)
}

pub fn entries(emulator: &EmulatorHandle, id: u64) -> Vec<Entry> {
    emulator.entries(channel(id))
}

/// Publishes `{tag}{ch}{field}` to each of channel `ch`'s 8 field topics.
pub async fn publish_channel(dev: &Device, ch: u64, tag: &str) {
    for f in 1..=8 {
        publish(
            dev,
            &format!("channels/{ch}/publish/fields/field{f}"),
            format!("{tag}{ch}{f}"),
        )
        .await;
    }
}

/// Whether the emulator got every value [`publish_channel`] sent with `tag`.
pub fn channel_delivered(got: &Delivered, ch: u64, tag: &str) -> bool {
    (1..=8).all(|f| {
        got.get(&(ch, format!("field{f}")))
            .is_some_and(|v| v.contains(&format!("{tag}{ch}{f}")))
    })
}
