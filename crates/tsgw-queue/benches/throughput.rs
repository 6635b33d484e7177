//! Throughput of the durable queue on this machine: `cargo bench -p tsgw-queue`.
//!
//! Pushes 100k readings (one per push, as sources do, and in batches of 100),
//! flushes, then drains them the way the forwarder does (peek 100, remove).
//! Prints writes/s, drains/s, encoded bytes/reading and the store's size on disk.
//! Then steady-state runs for SD-card wear: 1, 10 or 100 readings per flush
//! (that many readings/s at the default 1 s interval), delivered and removed as
//! they come, reporting
//! the bytes the process sent to the block device (`/proc/self/io`
//! `write_bytes`, so fsyncs included; file-system journal writes are not).

use std::path::Path;
use std::time::Instant;

use chrono::Utc;
use tsgw_core::{
    ChannelId, Field, Metrics, Origin, Reading, ReadingStore, SourceKind, Target, Value,
};
use tsgw_queue::{DurableQueue, QueueConfig};

const N: usize = 100_000;
const CHANNELS: u64 = 4;

fn reading(i: usize) -> Reading {
    Reading {
        channel: ChannelId::new(1_000_000 + (i as u64 % CHANNELS)).expect("non-zero"),
        target: Target::Field(Field::new((i % 8) as u8 + 1).expect("1..8")),
        value: Value::Number(20.0 + (i % 100) as f64 / 10.0),
        measured_at: Utc::now(),
        origin: Origin::new(SourceKind::Mqtt, "esp-kitchen"),
    }
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn run(rt: &tokio::runtime::Runtime, batch: usize, flush_every: usize, max_bytes: u64) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = QueueConfig {
        dir: tmp.path().join("queue"),
        max_bytes,
        ..QueueConfig::default()
    };
    let queue = DurableQueue::open(&config, Metrics::new()).expect("open");
    let readings: Vec<Reading> = (0..N).map(reading).collect();

    let start = Instant::now();
    let mut flush_secs = 0.0;
    for (i, chunk) in readings.chunks(batch).enumerate() {
        queue.push(chunk).expect("push");
        if ((i + 1) * batch).is_multiple_of(flush_every) {
            let f = Instant::now();
            rt.block_on(queue.flush()).expect("flush");
            flush_secs += f.elapsed().as_secs_f64();
        }
    }
    let f = Instant::now();
    rt.block_on(queue.flush()).expect("flush");
    flush_secs += f.elapsed().as_secs_f64();
    let push_secs = start.elapsed().as_secs_f64();
    let bytes_per_reading = queue.bytes() as f64 / queue.len() as f64;
    let disk = dir_size(&config.dir);

    let queued = queue.len() as usize;
    let start = Instant::now();
    let mut drained = 0;
    for channel in queue.channels().expect("channels") {
        loop {
            let got = queue.peek(channel, 100).expect("peek");
            if got.is_empty() {
                break;
            }
            drained += got.len();
            let keys: Vec<_> = got.iter().map(|q| q.key).collect();
            queue.remove(&keys).expect("remove");
        }
    }
    let drain_secs = start.elapsed().as_secs_f64();
    assert_eq!(drained, queued);
    rt.block_on(queue.flush()).expect("flush");
    let disk_after = dir_size(&config.dir);

    println!(
        "batch {batch:>3}, flush every {flush_every:>6}: push+flush {:>7.0} readings/s (of which flushing {:.2} s), drain (peek 100 + remove) {:>9.0} readings/s, \
         {bytes_per_reading:.1} encoded bytes/reading (key+value), store on disk {:.1} MiB full / {:.1} MiB drained",
        N as f64 / push_secs,
        flush_secs,
        drained as f64 / drain_secs,
        disk as f64 / 1048576.0,
        disk_after as f64 / 1048576.0,
    );
}

/// Bytes this process caused to be written to storage so far.
fn write_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/io")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))?
        .trim()
        .parse()
        .ok()
}

fn steady_state(rt: &tokio::runtime::Runtime, per_flush: usize) {
    const READINGS: usize = 20_000;
    let cycles = READINGS / per_flush;
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = QueueConfig {
        dir: tmp.path().join("queue"),
        ..QueueConfig::default()
    };
    let queue = DurableQueue::open(&config, Metrics::new()).expect("open");
    rt.block_on(queue.flush()).expect("flush");
    let Some(before) = write_bytes() else {
        println!("steady state: /proc/self/io not available, skipped");
        return;
    };
    let start = Instant::now();
    for cycle in 0..cycles {
        for k in 0..per_flush {
            queue.push(&[reading(cycle * per_flush + k)]).expect("push");
        }
        // The forwarder delivers and removes what was queued.
        for channel in queue.channels().expect("channels") {
            let got = queue.peek(channel, 100).expect("peek");
            let keys: Vec<_> = got.iter().map(|q| q.key).collect();
            queue.remove(&keys).expect("remove");
        }
        rt.block_on(queue.flush()).expect("flush");
    }
    let secs = start.elapsed().as_secs_f64();
    let written = write_bytes().unwrap_or(before) - before;
    let readings = (cycles * per_flush) as f64;
    println!(
        "steady state ({cycles} flushes of {per_flush:>3} readings, each delivered and removed): \
         {:.0} bytes written to storage per reading, {:.1} KiB per flush, {:.1} ms per cycle, \
         store on disk {:.1} MiB",
        written as f64 / readings,
        written as f64 / cycles as f64 / 1024.0,
        secs * 1000.0 / cycles as f64,
        dir_size(&config.dir) as f64 / 1048576.0,
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("tsgw-queue throughput, {N} readings over {CHANNELS} channels");
    // (readings per push, readings between flushes). The flusher flushes once
    // per interval, so at a realistic ingest rate few readings go into one flush.
    for (batch, flush_every) in [(1, 100), (1, 1_000), (1, N), (100, 1_000), (100, N)] {
        run(&rt, batch, flush_every, 1 << 30);
    }
    println!("queue full (max_bytes 1 MiB): every push first drops the oldest readings");
    for (batch, flush_every) in [(1, 1_000), (100, 1_000)] {
        run(&rt, batch, flush_every, 1 << 20);
    }
    for per_flush in [1, 10, 100] {
        steady_state(&rt, per_flush);
    }
}
