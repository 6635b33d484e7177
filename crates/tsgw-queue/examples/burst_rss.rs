//! Pushes a burst of readings into a fresh queue the way the gateway's writer
//! does (batches, a flush each interval) and prints throughput and peak RSS.
//! `cargo run --release -p tsgw-queue --example burst_rss -- [readings] [batch]`
//! Used to find where the gateway's memory goes during a burst (see
//! crates/tsgw-bench/README.md, "Footprint").

use std::time::{Duration, Instant};

use chrono::Utc;
use tsgw_core::{ChannelId, Field, Metrics, Origin, Reading, SourceKind, Target, Value};
use tsgw_queue::{DurableQueue, QueueConfig};

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let batch: usize = args.next().map_or(Ok(400), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let config = QueueConfig {
        dir: dir.path().join("q"),
        max_bytes: 512 << 20,
        // TSGW_CACHE_BYTES: try another sled cache size.
        cache_capacity_bytes: std::env::var("TSGW_CACHE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(QueueConfig::default().cache_capacity_bytes),
        ..QueueConfig::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let queue = DurableQueue::open(&config, Metrics::new())?;
    let channel = ChannelId::new(1001)?;
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let mut pushed = 0;
    while pushed < total {
        let n = batch.min(total - pushed);
        let readings: Vec<Reading> = (0..n)
            .map(|i| Reading {
                channel,
                target: Target::Field(Field::new(1).expect("field1")),
                value: Value::Number((pushed + i) as f64),
                measured_at: Utc::now(),
                origin: Origin::new(SourceKind::Mqtt, "burst"),
            })
            .collect();
        queue.push(&readings)?;
        pushed += n;
        if last_flush.elapsed() >= Duration::from_millis(config.flush_interval_ms) {
            rt.block_on(queue.flush())?;
            last_flush = Instant::now();
        }
    }
    rt.block_on(queue.flush())?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "pushed {total} readings in batches of {batch}: {:.0} readings/s, peak RSS {:.1} MiB, queue {} bytes, on disk {:.1} MiB",
        total as f64 / secs,
        peak_rss_kib() as f64 / 1024.0,
        queue.bytes(),
        dir_bytes(&config.dir) as f64 / (1 << 20) as f64,
    );
    // Drain it as the forwarder does (peek, remove), then see what the store
    // keeps on disk.
    let drain_start = Instant::now();
    let channel_store: &dyn tsgw_core::ReadingStore = &queue;
    loop {
        let batch = channel_store.peek(channel, 10_000)?;
        if batch.is_empty() {
            break;
        }
        let keys: Vec<_> = batch.iter().map(|q| q.key).collect();
        channel_store.remove(&keys)?;
    }
    rt.block_on(queue.flush())?;
    println!(
        "drained in {:.1} s: store on disk {:.1} MiB, peak RSS {:.1} MiB",
        drain_start.elapsed().as_secs_f64(),
        dir_bytes(&config.dir) as f64 / (1 << 20) as f64,
        peak_rss_kib() as f64 / 1024.0,
    );
    // What the flusher does within 10 s of a drain (see tsgw_queue's `swap`).
    let moved = queue.return_space_if_drained(2 << 20)?;
    println!(
        "moved to a fresh store: {moved}; store on disk {:.2} MiB",
        dir_bytes(&config.dir) as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Bytes allocated on disk by the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(m) if m.is_dir() => total += dir_bytes(&entry.path()),
            Ok(m) => total += m.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}
