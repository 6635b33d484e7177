//! Sources push from several threads while the forwarder peeks and removes.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{open, reading};
use tsgw_core::ReadingStore;

const PRODUCERS: u64 = 4;
const PER_PRODUCER: u64 = 2_000;

#[test]
fn concurrent_pushes_and_removals_lose_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (queue, metrics) = open(&tmp.path().join("queue"));
    let done = Arc::new(AtomicBool::new(false));

    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let q = queue.clone();
            thread::spawn(move || {
                let device = format!("producer-{p}");
                for i in 0..PER_PRODUCER {
                    // Every producer writes to every channel, in batches of 1 or 3.
                    if i % 4 == 0 {
                        let batch: Vec<_> = (0..3)
                            .map(|k| reading(1 + (i + k) % 3, &device, i * 10 + k))
                            .collect();
                        q.push(&batch).unwrap();
                    } else {
                        q.push(&[reading(1 + i % 3, &device, i * 10)]).unwrap();
                    }
                }
            })
        })
        .collect();

    let consumer = {
        let q = queue.clone();
        let done = done.clone();
        thread::spawn(move || {
            let mut seen = HashSet::new();
            let mut last_seq_per_channel = std::collections::HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let finished = done.load(Ordering::Acquire);
                let mut got_any = false;
                for channel in q.channels().unwrap() {
                    let batch = q.peek(channel, 50).unwrap();
                    for item in &batch {
                        let r = &item.reading;
                        assert!(
                            seen.insert((
                                r.origin.device.clone(),
                                r.value.as_f64().unwrap() as u64
                            )),
                            "delivered twice: {r:?}"
                        );
                        // Within a channel, readings come out in push order.
                        let last = last_seq_per_channel.entry(channel).or_insert(0);
                        assert!(item.key.seq > *last, "out of order in {channel}");
                        *last = item.key.seq;
                    }
                    got_any |= !batch.is_empty();
                    let keys: Vec<_> = batch.iter().map(|q| q.key).collect();
                    q.remove(&keys).unwrap();
                }
                if finished && !got_any && q.is_empty() {
                    return seen;
                }
                assert!(Instant::now() < deadline, "consumer did not finish in time");
                if !got_any {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };

    for p in producers {
        p.join().unwrap();
    }
    done.store(true, Ordering::Release);
    let seen = consumer.join().unwrap();

    let batches_of_three = PER_PRODUCER / 4;
    let expected = PRODUCERS * (PER_PRODUCER - batches_of_three + 3 * batches_of_three);
    assert_eq!(seen.len() as u64, expected);
    assert_eq!(queue.len(), 0);
    assert_eq!(queue.bytes(), 0);
    assert_eq!(metrics.queue_readings.get(), 0);
    assert_eq!(metrics.queue_bytes.get(), 0);
    assert_eq!(
        metrics
            .queue_dropped_total
            .with_label_values(&["full"])
            .get(),
        0
    );
}
