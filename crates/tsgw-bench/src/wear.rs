//! `tsgw-bench wear`: bytes written to storage per reading, the figure that
//! decides how long an SD card lives.
//!
//! For each rate, a fresh gateway runs with the product's defaults where they
//! matter for writes (queue flush interval, upstream update interval, queue
//! size, sled cache) against the local emulator; one MQTT device publishes
//! one reading per message at exactly that rate for `--seconds`. The figure
//! is the gateway's `write_bytes` from `/proc/<pid>/io` over the window,
//! divided by the readings it accepted in that window. `write_bytes` is
//! counted by the kernel when the process dirties a page-cache page that was
//! clean (so 4 KiB for a small write to a page written back since), which is
//! what reaches the card; it leaves out the file system's own journal and
//! metadata blocks, so the card sees somewhat more.
//!
//! The window starts after the gateway has connected upstream and settled,
//! and ends one flush interval (plus slack) after the last publish, so every
//! reading's flush is inside it. Writes by the forwarder (removing delivered
//! readings) are inside it too: they are part of what a reading costs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use thingspeak_emulator::EmulatorHandle;
use tsgw_queue::QueueConfig;
use tsgw_testkit::{emulator, http_get, metric_sum, Device, Gateway, GatewayConfig};

use crate::harness::{self, bench_rule, WAIT};
use crate::ingest::{bench_payload, bench_topic, qos_of};
use crate::stats::Table;

/// The gateway's default `upstream.update_interval_secs` (tsgw-forwarder's
/// config default, a free ThingSpeak account's 15 s).
const DEFAULT_UPDATE_INTERVAL_SECS: f64 = 15.0;
/// Seconds per (Julian) year, for "GB written per year".
const SECS_PER_YEAR: f64 = 365.25 * 24.0 * 3600.0;

#[derive(clap::Args, Debug, Clone)]
pub struct WearArgs {
    /// Readings per second, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub rates: Vec<u32>,
    /// Seconds each rate is fed.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// QoS of the device's publishes (0 or 1).
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// Seconds between the gateway's start and the window's start.
    #[arg(long, default_value_t = 3)]
    pub settle_seconds: u64,
    /// Where the queue lives during the run: on the file system to measure,
    /// not tmpfs (which writes nothing back and counts no write_bytes).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// `queue.flush_interval_ms` of the gateway (default: the product's
    /// default), to measure what a longer loss window saves.
    #[arg(long)]
    pub flush_ms: Option<u64>,
}

/// One rate's figures.
pub struct Wear {
    pub rate: u32,
    pub readings: u64,
    pub seconds: f64,
    pub write_bytes: u64,
}

impl Wear {
    pub fn bytes_per_reading(&self) -> f64 {
        self.write_bytes as f64 / self.readings as f64
    }

    /// GB (10^9 bytes) a year at this rate, around the clock.
    pub fn gb_per_year(&self) -> f64 {
        self.bytes_per_reading() * f64::from(self.rate) * SECS_PER_YEAR / 1e9
    }
}

pub async fn run(args: WearArgs, binary: PathBuf) -> Result<String> {
    if args.qos > 1 {
        bail!("--qos {}: only 0 and 1 are measured", args.qos);
    }
    if args.rates.contains(&0) || args.rates.is_empty() {
        bail!(
            "--rates {:?}: each rate must be at least 1 reading/s",
            args.rates
        );
    }
    let flush_ms = args
        .flush_ms
        .unwrap_or(QueueConfig::default().flush_interval_ms);
    let emu = emulator(Duration::from_secs_f64(DEFAULT_UPDATE_INTERVAL_SECS)).await?;
    let mut table = Table::new(&[
        "readings/s",
        "readings",
        "window",
        "write_bytes",
        "bytes/reading",
        "GB written/year",
        "load avg",
    ]);
    for &rate in &args.rates {
        let load_avg = harness::load_average();
        let wear = measure(&binary, &emu, &args, rate, flush_ms).await?;
        table.row(vec![
            rate.to_string(),
            wear.readings.to_string(),
            format!("{:.1} s", wear.seconds),
            wear.write_bytes.to_string(),
            format!("{:.0}", wear.bytes_per_reading()),
            format!("{:.1}", wear.gb_per_year()),
            load_avg,
        ]);
        eprintln!("{}", table.render());
    }
    Ok(format!(
        "### wear (QoS {qos}, {secs} s per rate, queue.flush_interval_ms = {flush_ms}, \
         update_interval_secs = {DEFAULT_UPDATE_INTERVAL_SECS}, write_bytes of the gateway process)\n\n{}\n\n{}\n",
        harness::machine_summary(),
        table.render(),
        qos = args.qos,
        secs = args.seconds,
    ))
}

async fn measure(
    binary: &Path,
    emu: &EmulatorHandle,
    args: &WearArgs,
    rate: u32,
    flush_ms: u64,
) -> Result<Wear> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&base)
        .with_context(|| format!("cannot make a directory in {}", base.display()))?;
    let mut config = GatewayConfig::for_emulator(emu, &dir.path().join("queue"))?;
    // The product's defaults for everything that decides what is written;
    // the kit's other settings only pick ports and the emulator.
    config.interval_secs = DEFAULT_UPDATE_INTERVAL_SECS;
    config.flush_interval_ms = flush_ms;
    config.max_bytes = None;
    config.extra = bench_rule().to_owned();
    let gateway = Gateway::start(binary, &config.write(dir.path())?, WAIT)?;
    let pid = gateway.pid();

    let device = Device::connect(gateway.mqtt, "wear", 1024).await?;
    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    let accepted_before = accepted(&gateway).await?;
    let bytes_before = write_bytes(pid)?;
    let started = Instant::now();

    let total = u64::from(rate) * args.seconds;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        device
            .publish(&bench_topic(0, n), qos_of(args.qos), bench_payload(0, n))
            .await?;
    }
    // Every reading accepted, then one flush interval and slack for its fsync.
    let deadline = Instant::now() + WAIT;
    let readings = loop {
        let done = accepted(&gateway).await? - accepted_before;
        if done >= total as f64 {
            break done as u64;
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway accepted {done} of {total} readings within {WAIT:?}; log:\n{}",
                gateway.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(flush_ms + 500)).await;
    let written = write_bytes(pid)? - bytes_before;
    let seconds = started.elapsed().as_secs_f64();
    drop(device);
    gateway.kill();
    if readings != total {
        bail!("the gateway accepted {readings} readings, {total} were published");
    }
    if written == 0 {
        bail!(
            "no write_bytes counted for {} readings: is {} on tmpfs? (pass --dir)",
            readings,
            base.display()
        );
    }
    Ok(Wear {
        rate,
        readings,
        seconds,
        write_bytes: written,
    })
}

async fn accepted(gateway: &Gateway) -> Result<f64> {
    let (_, text) = http_get(gateway.http, "/metrics", Duration::from_secs(10)).await?;
    Ok(metric_sum(
        &text,
        "tsgw_readings_total",
        &["result=\"accepted\""],
    ))
}

/// `write_bytes` of `pid` (/proc/<pid>/io).
pub fn write_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("cannot read /proc/{pid}/io"))?;
    parse_write_bytes(&io).with_context(|| format!("no write_bytes in /proc/{pid}/io"))
}

fn parse_write_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_bytes_is_read_from_proc_io() {
        let io = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 12288\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_write_bytes(io), Some(12288));
        assert_eq!(parse_write_bytes("rchar: 1\n"), None);
        // Our own process has the file (the kernel's task I/O accounting).
        write_bytes(std::process::id()).unwrap();
    }

    #[test]
    fn a_year_of_one_kib_per_reading_at_one_per_second() {
        let wear = Wear {
            rate: 1,
            readings: 60,
            seconds: 60.0,
            write_bytes: 60 * 1024,
        };
        assert_eq!(wear.bytes_per_reading(), 1024.0);
        // 1 KiB/s for a year: 32.3 GB.
        assert!(
            (wear.gb_per_year() - 32.315).abs() < 0.01,
            "{}",
            wear.gb_per_year()
        );
    }
}
