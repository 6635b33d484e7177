//! The flusher task: gauges, idleness, shutdown.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{open, reading};
use tokio_util::sync::CancellationToken;

/// Sizes and modification times of every file in the store.
fn snapshot(dir: &Path) -> Vec<(String, u64, SystemTime)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        if m.is_file() {
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.modified().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flusher_keeps_gauges_current_and_stops_on_cancel() {
    let tmp = tempfile::tempdir().unwrap();
    let (queue, metrics) = open(&tmp.path().join("queue"));
    let shutdown = CancellationToken::new();
    let flusher = queue.spawn_flusher(shutdown.clone());

    // The test readings were measured in 2025, so their age is large.
    queue
        .push(&[reading(1, "d", 0), reading(2, "d", 1)])
        .unwrap();
    assert_eq!(metrics.queue_readings.get(), 2);
    assert_eq!(metrics.queue_bytes.get() as u64, queue.bytes());
    tokio::time::timeout(Duration::from_secs(10), async {
        while metrics.queue_oldest_age_seconds.get() < 1000.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("oldest-age gauge was not refreshed");
    let expected = queue.oldest().unwrap();
    assert_eq!(expected, reading(1, "d", 0).measured_at);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), flusher)
        .await
        .expect("flusher did not stop on cancel")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flusher_does_not_touch_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let (queue, _) = open(&dir);
    let shutdown = CancellationToken::new();
    let flusher = queue.spawn_flusher(shutdown.clone());
    let batch: Vec<_> = (0..100).map(|n| reading(1, "d", n)).collect();
    queue.push(&batch).unwrap();
    queue.flush().await.unwrap();
    // Several 50 ms intervals pass with nothing dirty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = snapshot(&dir);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(snapshot(&dir), before, "an idle queue wrote to disk");

    // A single push makes it write again.
    queue.push(&[reading(1, "d", 1000)]).unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while snapshot(&dir) == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("push was never flushed");
    shutdown.cancel();
    flusher.await.unwrap();
}
