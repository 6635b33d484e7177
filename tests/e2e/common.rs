//! Harness for end-to-end tests: the real `tsgw` binary as a child process, the
//! ThingSpeak emulator in-process over TLS, and rumqttc clients as devices.
#![allow(dead_code)] // each test uses part of it

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use thingspeak::ChannelId;
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator, EmulatorHandle, Entry};

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(30);

pub const CHANNELS: [u64; 3] = [1001, 1002, 1003];
pub const CLIENT_ID: &str = "gw-client";
pub const USERNAME: &str = "gw-user";
pub const PASSWORD: &str = "gw-password-secret";

pub fn channel(id: u64) -> ChannelId {
    ChannelId::new(id).unwrap()
}

/// Installs the ring provider once for the test process (the emulator and clients use rustls).
pub fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The emulator with TLS, the three test channels and the gateway's device credentials.
pub async fn emulator(interval: Duration) -> EmulatorHandle {
    crypto();
    let mut builder = Emulator::builder()
        .tls("127.0.0.1:0")
        .http("127.0.0.1:0")
        .default_interval(interval);
    for id in CHANNELS {
        builder = builder.channel(ChannelSpec::new(
            channel(id),
            format!("WRITEKEY{id:08}"),
            format!("READKEY{id:09}"),
        ));
    }
    builder
        .device(DeviceSpec::new(
            CLIENT_ID,
            USERNAME,
            PASSWORD,
            CHANNELS.map(channel),
        ))
        .start()
        .await
        .expect("emulator starts")
}

/// A config for the gateway pointed at `emulator`, with ports chosen by the OS
/// (port 0; the harness reads the bound ports from the gateway's log).
pub fn config_toml(
    emulator: &EmulatorHandle,
    data_dir: &Path,
    interval_secs: f64,
    extra: &str,
) -> String {
    let tls = emulator.tls_addr().expect("emulator TLS listener");
    let ca = emulator.ca_file().expect("emulator CA file");
    // REST calls (reads for updates in doubt) go to the emulator, never out.
    let rest = match emulator.http_addr() {
        Some(http) => format!(
            "rest_host = \"127.0.0.1\"\nrest_port = {}\nrest_tls = false",
            http.port()
        ),
        None => "read_api = false".into(),
    };
    format!(
        r#"
[upstream]
host = "127.0.0.1"
port = {port}
transport = "tls"
ca_file = {ca:?}
client_id = "{CLIENT_ID}"
username = "{USERNAME}"
password = "{PASSWORD}"
update_interval_secs = {interval_secs}
keep_alive_secs = 5
reconnect_min_secs = 0.2
reconnect_max_secs = 1.0
{rest}

[queue]
dir = {queue:?}
flush_interval_ms = 200

[mqtt]
listen = "127.0.0.1:0"

[[mqtt.rules]]
name = "json-sensor"
topic = "sensors/+/json"
channel = 1001
parser = {{ format = "json", fields = {{ "/t" = "field1", "/h" = "field2" }} }}

[[mqtt.rules]]
name = "plain-sensor"
topic = "sensors/+/plain"
channel = 1001
parser = {{ format = "plain", target = "field3" }}

# Drop-in publishes may write these channels (the gateway refuses others).
[mqtt.drop_in]
channels = [1001, 1002, 1003]

[http]
listen = "127.0.0.1:0"
ready_upstream_grace_secs = 2

[log]
level = "info"
format = "json"
{extra}
"#,
        port = tls.port(),
        ca = ca.display().to_string(),
        queue = data_dir.join("queue").display().to_string(),
    )
}

/// The `tsgw` binary under test, running as a child process.
pub struct Gateway {
    pub child: Child,
    pub config: PathBuf,
    pub logs: Arc<Mutex<Vec<serde_json::Value>>>,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
}

impl Gateway {
    pub fn start(config_path: &Path) -> Gateway {
        Self::start_with_env(config_path, &[])
    }

    pub fn start_with_env(config_path: &Path, env: &[(&str, &str)]) -> Gateway {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tsgw"));
        command.args(["run", "--config"]).arg(config_path);
        for (k, v) in env {
            command.env(k, v);
        }
        Self::start_command(command, config_path)
    }

    /// Starts `command`, which must end up exec'ing `tsgw run --config <config_path>`
    /// (for example through `unshare`), so that the child's pid is the gateway's.
    pub fn start_command(mut command: Command, config_path: &Path) -> Gateway {
        command
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("tsgw starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap().push(value);
            }
        });
        let mut gateway = Gateway {
            child,
            config: config_path.to_path_buf(),
            logs,
            mqtt: "0.0.0.0:0".parse().unwrap(),
            http: "0.0.0.0:0".parse().unwrap(),
        };
        gateway.mqtt = gateway.addr_from_log("local MQTT listener ready");
        gateway.http = gateway.addr_from_log("metrics and health endpoint ready");
        gateway.wait_for_log("gateway running");
        gateway
    }

    /// Waits for a log line whose message is `message`; panics with the log on timeout.
    pub fn wait_for_log(&self, message: &str) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .logs
                .lock()
                .unwrap()
                .iter()
                .find(|l| l["fields"]["message"] == message)
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no log line {message:?} in time; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr_from_log(&self, message: &str) -> SocketAddr {
        let line = self.wait_for_log(message);
        line["fields"]["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("log line {message:?} has no addr: {line}"))
    }

    pub fn log_text(&self) -> String {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
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
        let (_, text) = self.get("/metrics").await;
        metric_value(&text, name_and_labels).unwrap_or(0.0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET, so the tests need no HTTP client crate.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("HTTP connect in time")
        .expect("HTTP connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("HTTP response in time")
        .expect("HTTP read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample in Prometheus text format: `name{a="b"}` as printed.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// A device: a rumqttc client connected to the gateway's local broker.
pub async fn device(broker: SocketAddr, id: &str) -> AsyncClient {
    connected(device_options(broker, id)).await
}

/// A device with a persistent session (clean session off): publishes the
/// gateway did not acknowledge are sent again after a reconnect, as the
/// gateway expects when it cannot store them (it acks only once on disk).
pub async fn persistent_device(broker: SocketAddr, id: &str) -> AsyncClient {
    let mut opts = device_options(broker, id);
    opts.set_clean_session(false);
    connected(opts).await
}

fn device_options(broker: SocketAddr, id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts
}

/// Starts a client's event loop (reconnecting after errors) and returns once connected.
async fn connected(opts: MqttOptions) -> AsyncClient {
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, rx)
        .await
        .expect("device connects in time")
        .unwrap();
    client
}

pub async fn publish(device: &AsyncClient, topic: &str, payload: impl Into<Vec<u8>>) {
    device
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("publish queued");
}

/// Every value each (channel, target) ever had at the emulator.
pub fn delivered(emulator: &EmulatorHandle) -> BTreeMap<(u64, String), Vec<String>> {
    let mut out: BTreeMap<(u64, String), Vec<String>> = BTreeMap::new();
    for id in CHANNELS {
        for entry in emulator.entries(channel(id)) {
            for target in thingspeak::payload::all_targets() {
                if let Some(v) = entry.get(target) {
                    out.entry((id, target.to_string()))
                        .or_default()
                        .push(v.to_owned());
                }
            }
        }
    }
    out
}

/// Waits until `cond` holds on the emulator's entries, or panics with what arrived.
pub async fn wait_for_delivery(
    emulator: &EmulatorHandle,
    what: &str,
    cond: impl Fn(&BTreeMap<(u64, String), Vec<String>>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = delivered(emulator);
        if cond(&got) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; delivered: {got:?}; emulator counters: {:?}",
            emulator.counters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn entries(emulator: &EmulatorHandle, id: u64) -> Vec<Entry> {
    emulator.entries(channel(id))
}

pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Publishes `{tag}{ch}{field}` to each of channel `ch`'s 8 field topics.
pub async fn publish_channel(dev: &rumqttc::AsyncClient, ch: u64, tag: &str) {
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
pub fn channel_delivered(
    got: &std::collections::BTreeMap<(u64, String), Vec<String>>,
    ch: u64,
    tag: &str,
) -> bool {
    (1..=8).all(|f| {
        got.get(&(ch, format!("field{f}")))
            .is_some_and(|v| v.contains(&format!("{tag}{ch}{f}")))
    })
}
