//! What only the bench needs on top of tsgw-testkit: its gateway config
//! profile, its wait bound, and /proc figures of processes and the machine.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use thingspeak_emulator::EmulatorHandle;
use tsgw_testkit::{Gateway, GatewayConfig, Rest};

/// Upper bound for any single wait (a gateway start, a drain).
pub const WAIT: Duration = Duration::from_secs(60);

/// The one mapping rule every bench load uses: `bench/<device>` JSON `{"v": …}` → field1 of 1001.
const BENCH_RULE: &str = r#"
[[mqtt.rules]]
name = "bench"
topic = "bench/+"
channel = 1001
parser = { format = "json", fields = { "/v" = "field1" } }
"#;

/// The `[[mqtt.rules]]` entry of [`BENCH_RULE`], for configs built elsewhere.
pub fn bench_rule() -> &'static str {
    BENCH_RULE
}

/// The bench's gateway config against `emulator`: rate limit
/// `interval_secs`, fsync every `flush_interval_ms`, room for big loads
/// (256 MiB queue, 2000 connections) and the bench rule; no REST calls
/// (updates in doubt are settled by MQTT evidence only).
pub fn gateway_config(
    emulator: &EmulatorHandle,
    queue_dir: &Path,
    interval_secs: f64,
    flush_interval_ms: u64,
) -> Result<GatewayConfig> {
    Ok(bench_profile(
        GatewayConfig::for_emulator(emulator, queue_dir)?,
        interval_secs,
        flush_interval_ms,
    ))
}

/// [`gateway_config`]'s settings applied to `config` (whose upstream the caller chose).
pub fn bench_profile(
    mut config: GatewayConfig,
    interval_secs: f64,
    flush_interval_ms: u64,
) -> GatewayConfig {
    config.interval_secs = interval_secs;
    config.keep_alive_secs = 10;
    config.flush_interval_ms = flush_interval_ms;
    config.max_bytes = Some(268_435_456);
    config.max_connections = Some(2000);
    config.ready_upstream_grace_secs = 5;
    config.rest = Rest::Off;
    config.extra = bench_rule().to_owned();
    config
}

/// Writes `config` into `dir` and starts `binary` on it.
pub fn start_gateway(binary: &Path, config: &GatewayConfig, dir: &Path) -> Result<Gateway> {
    Gateway::start(binary, &config.write(dir)?, WAIT)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_readable() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        cpu_ticks(pid).unwrap();
    }
}
