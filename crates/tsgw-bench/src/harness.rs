//! What every harness needs: the emulator in-process, the real `tsgw` binary as
//! a child process, Prometheus scrapes, MQTT devices and /proc figures.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use thingspeak::ChannelId;
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator, EmulatorBuilder, EmulatorHandle};

/// Upper bound for any single wait (a gateway start, a connect, a drain).
pub const WAIT: Duration = Duration::from_secs(60);

pub const CHANNELS: [u64; 3] = [1001, 1002, 1003];
pub const CLIENT_ID: &str = "bench-gw";
pub const USERNAME: &str = "bench-user";
pub const PASSWORD: &str = "bench-password";

pub fn channel(id: u64) -> ChannelId {
    ChannelId::new(id).expect("bench channel ids are valid")
}

/// Installs ring as the process-wide rustls provider (emulator and clients use rustls).
pub fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The emulator with TLS (for tsgw), plain TCP (for mosquitto's bridge) and
/// the three bench channels, rate limit `interval`.
pub async fn emulator(interval: Duration) -> Result<EmulatorHandle> {
    crypto();
    emulator_builder(interval)
        .tls("127.0.0.1:0")
        .tcp("127.0.0.1:0")
        .start()
        .await
        .map_err(|e| anyhow!("emulator does not start: {e}"))
}

/// An emulator with the three bench channels and the gateway's device
/// account, rate limit `interval`; the caller adds listeners.
pub fn emulator_builder(interval: Duration) -> EmulatorBuilder {
    let mut builder = Emulator::builder().default_interval(interval);
    for id in CHANNELS {
        builder = builder.channel(ChannelSpec::new(
            channel(id),
            write_key(id),
            format!("READKEY{id:09}"),
        ));
    }
    builder.device(DeviceSpec::new(
        CLIENT_ID,
        USERNAME,
        PASSWORD,
        CHANNELS.map(channel),
    ))
}

/// The emulated Write API key of bench channel `id`.
pub fn write_key(id: u64) -> String {
    format!("WRITEKEY{id:08}")
}

/// A gateway config: upstream = `emulator` over TLS, OS-assigned local ports,
/// JSON logs (the harness reads bound addresses from them). `extra` is
/// appended (rules, overrides).
pub fn gateway_config(
    emulator: &EmulatorHandle,
    queue_dir: &Path,
    interval_secs: f64,
    flush_interval_ms: u64,
    extra: &str,
) -> Result<String> {
    let tls = emulator
        .tls_addr()
        .context("emulator has no TLS listener")?;
    let ca = emulator.ca_file().context("emulator has no CA file")?;
    let upstream = Upstream {
        port: tls.port(),
        ca,
        reconnect_secs: (0.2, 1.0),
        extra: "",
    };
    Ok(gateway_config_to(
        &upstream,
        queue_dir,
        interval_secs,
        flush_interval_ms,
        extra,
    ))
}

/// Where the gateway's upstream is, for harnesses that put something (a
/// relay that can cut the link) between the gateway and the emulator.
pub struct Upstream<'a> {
    /// MQTT-over-TLS port on 127.0.0.1 (the emulator's certificate covers that address).
    pub port: u16,
    /// The emulator's CA, trusted by the gateway.
    pub ca: &'a Path,
    /// `reconnect_min_secs`, `reconnect_max_secs`.
    pub reconnect_secs: (f64, f64),
    /// More `[upstream]` keys (`key = value` lines).
    pub extra: &'a str,
}

/// [`gateway_config`] with the upstream given explicitly.
pub fn gateway_config_to(
    upstream: &Upstream<'_>,
    queue_dir: &Path,
    interval_secs: f64,
    flush_interval_ms: u64,
    extra: &str,
) -> String {
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
keep_alive_secs = 10
reconnect_min_secs = {reconnect_min:?}
reconnect_max_secs = {reconnect_max:?}
{reads}
{upstream_extra}

[queue]
dir = {queue:?}
flush_interval_ms = {flush_interval_ms}
max_bytes = 268435456

[mqtt]
listen = "127.0.0.1:0"
max_connections = 2000

# Drop-in publishes may write these channels (the gateway refuses others).
[mqtt.drop_in]
channels = [1001, 1002, 1003]

[[mqtt.rules]]
name = "bench"
topic = "bench/+"
channel = 1001
parser = {{ format = "json", fields = {{ "/v" = "field1" }} }}

[http]
listen = "127.0.0.1:0"
ready_upstream_grace_secs = 5

[log]
level = "info"
format = "json"
{extra}
"#,
        port = upstream.port,
        ca = upstream.ca.display().to_string(),
        reconnect_min = upstream.reconnect_secs.0,
        reconnect_max = upstream.reconnect_secs.1,
        upstream_extra = upstream.extra,
        // Without a REST endpoint of the emulator's, reads for updates in
        // doubt would go to api.thingspeak.com: the MQTT evidence only.
        reads = if upstream.extra.contains("rest_host") {
            ""
        } else {
            "read_api = false"
        },
        queue = queue_dir.display().to_string(),
    )
}

/// Where the release `tsgw` binary is: `--tsgw`, else next to this binary.
pub fn tsgw_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find the bench's own path")?
            .with_file_name("tsgw"),
    };
    if !path.exists() {
        bail!(
            "tsgw binary {} not found: run `cargo build --release -p tsgw -p tsgw-bench` or pass --tsgw",
            path.display()
        );
    }
    Ok(path)
}

/// The `tsgw` binary running as a child process.
pub struct Gateway {
    pub child: Child,
    pub logs: Arc<Mutex<Vec<serde_json::Value>>>,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// From spawn to the "gateway running" log line.
    pub startup: Duration,
}

impl Gateway {
    pub fn start(binary: &Path, config: &Path) -> Result<Gateway> {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stderr = child.stderr.take().context("stderr not piped")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(value);
            }
        });
        let mut gateway = Gateway {
            child,
            logs,
            mqtt: SocketAddr::from(([0, 0, 0, 0], 0)),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
            startup: Duration::ZERO,
        };
        gateway.mqtt = gateway.addr_from_log("local MQTT listener ready")?;
        gateway.http = gateway.addr_from_log("metrics and health endpoint ready")?;
        gateway.wait_for_log("gateway running")?;
        gateway.startup = started.elapsed();
        Ok(gateway)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn find_log(&self, message: &str) -> Option<serde_json::Value> {
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .cloned()
    }

    pub fn wait_for_log(&mut self, message: &str) -> Result<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.find_log(message) {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "tsgw exited ({status}) before logging {message:?}; log:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line {message:?} in {WAIT:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn addr_from_log(&mut self, message: &str) -> Result<SocketAddr> {
        let line = self.wait_for_log(message)?;
        line["fields"]["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("log line {message:?} has no addr: {line}"))
    }

    pub fn log_text(&self) -> String {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let start = logs.len().saturating_sub(40);
        logs[start..]
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILL: no chance to flush.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(self.http, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (no HTTP client crate needed for loopback scrapes).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| anyhow!("GET {path} from {addr} timed out"))?
        .with_context(|| format!("GET {path} from {addr}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sum of every sample of `name` whose label set contains all of `labels`
/// (each like `result="accepted"`). 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, label_part) = match key.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (key, ""),
            };
            (metric == name && labels.iter().all(|want| label_part.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        // An empty f64 sum is -0.0, which prints as "-0".
        .sum::<f64>()
        + 0.0
}

/// A load-generating device: a rumqttc client plus counters kept by its event loop.
pub struct Device {
    pub client: AsyncClient,
    /// PUBLISH packets written to the socket (rumqttc reports them after the write).
    pub sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects `id` to `broker`; waits for CONNACK.
    pub async fn connect(broker: SocketAddr, id: &str, capacity: usize) -> Result<Device> {
        let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(1000);
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, capacity);
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let s = sent.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, rx)
            .await
            .map_err(|_| anyhow!("device {id} did not connect to {broker} in {WAIT:?}"))?
            .map_err(|_| anyhow!("device {id} event loop ended"))?;
        Ok(Device { client, sent, task })
    }

    pub async fn publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .map_err(|e| anyhow!("publish to {topic}: {e}"))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resident set size of `pid`, KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// utime + stime of `pid` in clock ticks (fields 14 and 15 of /proc/<pid>/stat).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; count fields after its ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field 14 is index 11.
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we run on).
pub fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The machine and its load, for the README next to the figures.
pub fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!(
        "machine: {nproc} CPUs ({cpu}), MemTotal {mem}, load average {}",
        load_average()
    )
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A connected MQTT device whose PUBACK packet ids arrive on `acks`. Its
/// event loop ends at the first connection error and never reconnects: a
/// reconnect would replay unacked messages behind the bench's back, and a
/// missing PUBACK is what the harnesses check for.
pub struct AckedDevice {
    pub client: AsyncClient,
    pub acks: tokio::sync::mpsc::UnboundedReceiver<u16>,
    pub eventloop: tokio::task::JoinHandle<()>,
}

impl AckedDevice {
    pub async fn connect(broker: SocketAddr, id: &str) -> Result<AckedDevice> {
        let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        let (ack_tx, acks) = tokio::sync::mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
        let mut conn_tx = Some(conn_tx);
        let eventloop = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = conn_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = ack_tx.send(a.pkid);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        tokio::time::timeout(WAIT, conn_rx)
            .await
            .map_err(|_| anyhow!("device {id} did not connect to {broker}"))?
            .map_err(|_| anyhow!("device {id}: connection failed"))?;
        Ok(AckedDevice {
            client,
            acks,
            eventloop,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sum_adds_matching_series_only() {
        let text = "# HELP x\n\
            tsgw_readings_total{device=\"bench\",result=\"accepted\",source=\"mqtt\"} 7\n\
            tsgw_readings_total{device=\"other\",result=\"accepted\",source=\"mqtt\"} 3\n\
            tsgw_readings_total{device=\"bench\",result=\"rejected\",source=\"mqtt\"} 100\n\
            tsgw_queue_readings 42\n";
        assert_eq!(
            metric_sum(text, "tsgw_readings_total", &["result=\"accepted\""]),
            10.0
        );
        assert_eq!(metric_sum(text, "tsgw_queue_readings", &[]), 42.0);
        assert_eq!(metric_sum(text, "tsgw_queue_bytes", &[]), 0.0);
    }

    #[test]
    fn own_process_figures_are_readable() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        cpu_ticks(pid).unwrap();
    }
}
