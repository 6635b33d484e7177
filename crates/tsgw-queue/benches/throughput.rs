//! Throughput of the durable queue on this machine: `cargo bench -p tsgw-queue`.
//!
//! Pushes 100k readings (one per push, as sources do, and in batches of 100),
//! flushes, then drains them the way the forwarder does (peek 100, remove).
//! Prints writes/s, drains/s, encoded bytes/reading and the store's size on disk.

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

fn run(rt: &tokio::runtime::Runtime, batch: usize) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = QueueConfig {
        dir: tmp.path().join("queue"),
        max_bytes: 1 << 30,
        ..QueueConfig::default()
    };
    let queue = DurableQueue::open(&config, Metrics::new()).expect("open");
    let readings: Vec<Reading> = (0..N).map(reading).collect();

    let start = Instant::now();
    for chunk in readings.chunks(batch) {
        queue.push(chunk).expect("push");
    }
    let push_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    rt.block_on(queue.flush()).expect("flush");
    let flush_secs = start.elapsed().as_secs_f64();
    let bytes_per_reading = queue.bytes() as f64 / queue.len() as f64;
    let disk = dir_size(&config.dir);

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
    assert_eq!(drained, N);
    rt.block_on(queue.flush()).expect("flush");
    let disk_after = dir_size(&config.dir);

    println!(
        "batch {batch:>3}: push {:>9.0} readings/s, flush {:.3} s, drain (peek 100 + remove) {:>9.0} readings/s, \
         {bytes_per_reading:.1} encoded bytes/reading (key+value), store on disk {:.1} MiB full / {:.1} MiB drained",
        N as f64 / push_secs,
        flush_secs,
        N as f64 / drain_secs,
        disk as f64 / 1048576.0,
        disk_after as f64 / 1048576.0,
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("tsgw-queue throughput, {N} readings over {CHANNELS} channels");
    for batch in [1, 100] {
        run(&rt, batch);
    }
}
