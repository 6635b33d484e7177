//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use tsgw_core::{
    ChannelId, Field, Metrics, Origin, Reading, ReadingStore, SourceKind, Target, Value,
};
use tsgw_queue::{DurableQueue, QueueConfig};

pub fn ch(n: u64) -> ChannelId {
    ChannelId::new(n).expect("test channel ids are positive")
}

/// A reading whose value and device identify it uniquely in a test.
pub fn reading(channel: u64, device: &str, n: u64) -> Reading {
    Reading {
        channel: ch(channel),
        target: Target::Field(Field::new((n % 8) as u8 + 1).expect("1..8")),
        value: Value::Number(n as f64),
        measured_at: DateTime::<Utc>::from_timestamp(1_764_000_000 + n as i64, 0)
            .expect("valid timestamp"),
        origin: Origin::new(SourceKind::Mqtt, device),
    }
}

pub fn config(dir: &Path) -> QueueConfig {
    QueueConfig {
        dir: dir.to_path_buf(),
        max_bytes: 256 << 20,
        flush_interval_ms: 50,
        ..QueueConfig::default()
    }
}

pub fn open(dir: &Path) -> (DurableQueue, Metrics) {
    init_logs();
    let metrics = Metrics::new();
    let queue = DurableQueue::open(&config(dir), metrics.clone()).expect("queue opens");
    (queue, metrics)
}

/// Every queued reading with its seq, channel by channel, oldest first.
pub fn drain_view(queue: &DurableQueue) -> Vec<(u64, Reading)> {
    let mut out = Vec::new();
    for channel in queue.channels().expect("channels") {
        for q in queue.peek(channel, usize::MAX).expect("peek") {
            out.push((q.key.seq, q.reading));
        }
    }
    out
}

/// Directories next to `dir` named `<dir>.corrupt-*`.
pub fn quarantined_dirs(dir: &Path) -> Vec<PathBuf> {
    let name = dir
        .file_name()
        .expect("dir has a name")
        .to_string_lossy()
        .into_owned();
    let prefix = format!("{name}.corrupt-");
    let parent = dir.parent().expect("dir has a parent");
    let mut found: Vec<PathBuf> = std::fs::read_dir(parent)
        .expect("parent readable")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Shows the queue's log lines in a failing test's output.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("tsgw_queue=debug")
        .try_init();
}
