//! `tsgw-bench resources`: RSS, CPU, binary size, and startup with a backlog.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use rumqttc::QoS;
use tsgw_core::{Field, Metrics, Origin, Reading, SourceKind, Target, Value};
use tsgw_queue::{DurableQueue, QueueConfig};

use tsgw_testkit::{channel, emulator, metric_sum, CHANNELS};

use crate::harness::{self, clock_ticks_per_sec, cpu_ticks, gateway_config, mib, rss_kib};
use crate::ingest::{bench_payload, bench_topic, probe_metric, start_gateway, Upstream};
use crate::load::{self, LoadSpec};
use crate::stats::Table;

#[derive(clap::Args, Debug, Clone)]
pub struct ResourcesArgs {
    /// Seconds of idle over which CPU is measured.
    #[arg(long, default_value_t = 30)]
    pub idle_seconds: u64,
    /// Readings pre-filled into the queue for the startup/backlog figures.
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog: u64,
    /// Seconds of flood load for the RSS-under-load figure.
    #[arg(long, default_value_t = 10)]
    pub load_seconds: u64,
    /// Seconds the backlog is watched draining upstream.
    #[arg(long, default_value_t = 20)]
    pub drain_seconds: u64,
}

/// Fills a queue dir through the queue library, as the gateway's writer
/// would (batches of 512), and returns (seconds, bytes on disk).
pub async fn prefill(dir: &Path, readings: u64) -> Result<(f64, u64)> {
    let config = QueueConfig {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        ..QueueConfig::default()
    };
    let queue = DurableQueue::open(&config, Metrics::new())
        .with_context(|| format!("open queue {}", dir.display()))?;
    let started = Instant::now();
    let now = Utc::now();
    let mut batch = Vec::with_capacity(512);
    for i in 0..readings {
        let channel = channel(CHANNELS[(i % 3) as usize]);
        let field = Field::new((i % 8) as u8 + 1).context("field")?;
        batch.push(Reading {
            channel,
            target: Target::Field(field),
            value: Value::Number(i as f64 / 10.0),
            measured_at: now,
            origin: Origin::new(SourceKind::Mqtt, "prefill"),
        });
        if batch.len() == 512 {
            queue.push(&batch)?;
            batch.clear();
        }
    }
    queue.push(&batch)?;
    queue.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    drop(queue);
    Ok((secs, dir_bytes(dir)))
}

pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
            Ok(m) => total += m.len(),
            Err(_) => {}
        }
    }
    total
}

pub async fn run(args: ResourcesArgs, binary: PathBuf) -> Result<String> {
    let emu = emulator(Duration::from_secs(1)).await?;
    let mut table = Table::new(&["figure", "value", "target", "notes"]);
    let size = std::fs::metadata(&binary)?.len();
    table.row(vec![
        "release binary size".into(),
        format!("{:.1} MiB", size as f64 / 1048576.0),
        "—".into(),
        binary.display().to_string(),
    ]);

    // Idle: connected upstream, no devices.
    let dir = tempfile::tempdir()?;
    let gateway = start_gateway(&binary, &emu, dir.path())?;
    table.row(vec![
        "startup, empty queue".into(),
        format!("{:.0} ms", gateway.startup.as_secs_f64() * 1000.0),
        "—".into(),
        "spawn → \"gateway running\" log line".into(),
    ]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = gateway.pid();
    let rss_idle = rss_kib(pid)?;
    let t0 = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let cpu_idle =
        (cpu_ticks(pid)? - t0) as f64 / clock_ticks_per_sec() / started.elapsed().as_secs_f64();
    let rss_idle_end = rss_kib(pid)?;
    table.row(vec![
        "RSS idle".into(),
        format!(
            "{:.1} MiB (after {} s: {:.1} MiB)",
            mib(rss_idle),
            args.idle_seconds,
            mib(rss_idle_end)
        ),
        "< 20 MiB".into(),
        "upstream connected, no devices".into(),
    ]);
    table.row(vec![
        format!("CPU idle over {} s", args.idle_seconds),
        format!("{:.2} % of a core", cpu_idle * 100.0),
        "< 0.5 %".into(),
        format!("utime+stime, {} Hz ticks", clock_ticks_per_sec()),
    ]);
    eprintln!("{}", table.render());

    // Under load: the same gateway, QoS 0 flood.
    let spec = LoadSpec {
        publishers: 4,
        qos: QoS::AtMostOnce,
        rate: None,
        warmup: Duration::from_secs(2),
        duration: Duration::from_secs(args.load_seconds),
        topic: bench_topic,
        payload: bench_payload,
    };
    let outcome = load::run(
        gateway.mqtt,
        &spec,
        probe_metric(&gateway, Upstream::Up),
        Duration::from_millis(20),
        Duration::from_secs(5),
        Some(pid),
    )
    .await?;
    table.row(vec![
        "RSS under load (peak)".into(),
        format!("{:.1} MiB", mib(outcome.peak_rss_kib)),
        "—".into(),
        format!(
            "QoS 0 flood, 4 publishers, {:.0} readings/s accepted, CPU {:.0} % of a core",
            outcome.done_rate(),
            outcome.cpu_share * 100.0
        ),
    ]);
    gateway.kill();
    eprintln!("{}", table.render());

    // Backlog: pre-fill through the queue library, start with upstream refused.
    let dir = tempfile::tempdir()?;
    let queue_dir = dir.path().join("queue");
    let (fill_secs, disk) = prefill(&queue_dir, args.backlog).await?;
    table.row(vec![
        format!("queue pre-fill, {} readings", args.backlog),
        format!("{:.0} readings/s", args.backlog as f64 / fill_secs),
        "—".into(),
        format!(
            "tsgw-queue push in batches of 512 + flush; {:.1} MiB on disk = {:.0} B/reading",
            disk as f64 / 1048576.0,
            disk as f64 / args.backlog.max(1) as f64
        ),
    ]);
    emu.refuse_connections_for(Duration::from_secs(3600));
    let config = gateway_config(&emu, &queue_dir, 1.0, 1000)?;
    let gateway = harness::start_gateway(&binary, &config, dir.path())?;
    let queued = metric_sum(&gateway.metrics().await?, "tsgw_queue_readings", &[]);
    table.row(vec![
        format!("startup with {} readings queued", args.backlog),
        format!("{:.0} ms", gateway.startup.as_secs_f64() * 1000.0),
        "—".into(),
        format!("spawn → \"gateway running\"; tsgw_queue_readings = {queued:.0}"),
    ]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_backlog = rss_kib(gateway.pid())?;
    table.row(vec![
        "RSS with the backlog, upstream down".into(),
        format!("{:.1} MiB", mib(rss_backlog)),
        "< 64 MiB".into(),
        "5 s after start".into(),
    ]);
    emu.clear_faults();
    let started = Instant::now();
    let mut peak = rss_backlog;
    while started.elapsed() < Duration::from_secs(args.drain_seconds) {
        peak = peak.max(rss_kib(gateway.pid())?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = metric_sum(&gateway.metrics().await?, "tsgw_queue_readings", &[]);
    table.row(vec![
        "RSS while draining the backlog (peak)".into(),
        format!("{:.1} MiB", mib(peak)),
        "< 64 MiB".into(),
        format!(
            "upstream up (1 s per channel): {:.0} readings drained in {} s",
            queued - left,
            args.drain_seconds
        ),
    ]);
    gateway.kill();
    Ok(format!(
        "### resources\n\n{}\n\n{}\n",
        harness::machine_summary(),
        table.render()
    ))
}
