//! The real `tsgw` binary as a child process, its JSON log collected line by
//! line so the kit can read the addresses it bound and wait for messages.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::metrics::{http_get_with, metric_value};

/// Log lines shown in error messages (the newest ones).
const LOG_TAIL: usize = 40;

/// Where the `tsgw` binary is: `given`, else next to the running executable
/// (how `cargo build -p tsgw -p tsgw-bench` lays them out).
pub fn tsgw_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find the running executable's path")?
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

/// The `tsgw` binary running as a child process. Dropping it SIGKILLs it.
pub struct Gateway {
    pub child: Child,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// From spawn to the "gateway running" log line.
    pub startup: Duration,
    /// Bound of every wait on this gateway (log lines, HTTP, a stop).
    pub timeout: Duration,
}

impl Gateway {
    /// `binary run --config <config>`, as [`Gateway::spawn`] wants it.
    pub fn command(binary: &Path, config: &Path) -> Command {
        let mut command = Command::new(binary);
        command.args(["run", "--config"]).arg(config);
        command
    }

    /// Starts `binary` on `config` and waits (up to `timeout`) until it runs.
    pub fn start(binary: &Path, config: &Path, timeout: Duration) -> Result<Gateway> {
        Self::spawn(Self::command(binary, config), timeout)
    }

    /// Starts `command`, which must run `tsgw run` with a JSON-logging config
    /// in the spawned process itself (an `exec` at the end of a wrapper such
    /// as `unshare` is fine), so that the child's pid is the gateway's.
    /// Returns once the gateway logged its bound addresses and "gateway running".
    pub fn spawn(mut command: Command, timeout: Duration) -> Result<Gateway> {
        let started = Instant::now();
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
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
            timeout,
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

    fn lines(&self) -> MutexGuard<'_, Vec<serde_json::Value>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every log line so far (a copy).
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.lines().clone()
    }

    /// The first log line whose message is `message`.
    pub fn find_log(&self, message: &str) -> Option<serde_json::Value> {
        self.lines()
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .cloned()
    }

    /// How many log lines so far have the message `message`.
    pub fn count_log(&self, message: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l["fields"]["message"] == message)
            .count()
    }

    /// Waits for a log line whose message is `message`; fails when the
    /// gateway exits first or on timeout, with the log's tail.
    pub fn wait_for_log(&mut self, message: &str) -> Result<serde_json::Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(line) = self.find_log(message) {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "tsgw exited ({status}) before logging {message:?}; log:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line {message:?} in {:?}; log:\n{}",
                    self.timeout,
                    self.log_tail()
                );
            }
            // Short: restart times are measured up to "gateway running".
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

    /// The whole log, one JSON line each.
    pub fn log_text(&self) -> String {
        join(&self.lines())
    }

    /// The newest lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let lines = self.lines();
        join(&lines[lines.len().saturating_sub(LOG_TAIL)..])
    }

    /// SIGKILL: no chance to flush.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (a name such as `TERM` or `HUP`) to the gateway.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -{signal} {} failed: {status}", self.pid());
        }
        Ok(())
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal("TERM")?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway did not stop on SIGTERM in {:?}; log:\n{}",
                    self.timeout,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` from the gateway's HTTP endpoint: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        self.get_with(path, &[]).await
    }

    /// [`Gateway::get`] with more request headers (`Authorization`, ...).
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
        http_get_with(self.http, path, headers, self.timeout).await
    }

    /// The Prometheus text of /metrics.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    /// One sample of /metrics, `name{a="b"}` exactly as printed; 0 when absent.
    pub async fn metric(&self, name_and_labels: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics().await?, name_and_labels).unwrap_or(0.0))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn join(lines: &[serde_json::Value]) -> String {
    lines
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
