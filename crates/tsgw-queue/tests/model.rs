//! Property test: any sequence of pushes, removals and reopens leaves the queue
//! exactly where a simple in-memory model says: same readings, same order per
//! channel, same byte count, oldest-first eviction across channels.

mod common;

use std::collections::VecDeque;

use proptest::prelude::*;
use tsgw_core::{Metrics, Reading, ReadingStore};
use tsgw_queue::codec::{encode_value, KEY_LEN};
use tsgw_queue::{DurableQueue, QueueConfig};

const MAX_BYTES: u64 = 2048;

#[derive(Debug, Clone)]
enum Op {
    /// Readings for these channels, in one push.
    Push(Vec<u64>),
    /// Peek up to n readings of a channel and remove them, as the forwarder does.
    Deliver(u64, usize),
    /// Close and open the store again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(1u64..=4, 1..6).prop_map(Op::Push),
        3 => (1u64..=4, 1usize..6).prop_map(|(c, n)| Op::Deliver(c, n)),
        1 => Just(Op::Reopen),
    ]
}

/// Queue contents in push order: (channel, value, encoded bytes).
#[derive(Default)]
struct Model {
    items: VecDeque<(u64, u64, u64)>,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.items.iter().map(|i| i.2).sum()
    }

    fn push(&mut self, batch: &[Reading]) {
        let add: Vec<_> = batch
            .iter()
            .map(|r| {
                let size = (KEY_LEN + encode_value(r).len()) as u64;
                (r.channel.get(), r.value.as_f64().unwrap() as u64, size)
            })
            .collect();
        let need: u64 = add.iter().map(|a| a.2).sum();
        while self.bytes() + need > MAX_BYTES {
            self.items.pop_front();
        }
        self.items.extend(add);
    }

    fn channel(&self, channel: u64) -> Vec<u64> {
        self.items
            .iter()
            .filter(|i| i.0 == channel)
            .map(|i| i.1)
            .collect()
    }

    fn remove(&mut self, channel: u64, values: &[u64]) {
        self.items
            .retain(|i| !(i.0 == channel && values.contains(&i.1)));
    }
}

fn config(dir: &std::path::Path) -> QueueConfig {
    QueueConfig {
        max_bytes: MAX_BYTES,
        ..common::config(dir)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("queue");
        let mut queue = DurableQueue::open(&config(&dir), Metrics::new()).unwrap();
        let mut model = Model::default();
        let mut next_value = 0u64;
        for op in ops {
            match op {
                Op::Push(channels) => {
                    let batch: Vec<Reading> = channels
                        .iter()
                        .map(|c| {
                            next_value += 1;
                            common::reading(*c, "model", next_value)
                        })
                        .collect();
                    queue.push(&batch).unwrap();
                    model.push(&batch);
                }
                Op::Deliver(channel, n) => {
                    let got = queue.peek(common::ch(channel), n).unwrap();
                    let values: Vec<u64> =
                        got.iter().map(|q| q.reading.value.as_f64().unwrap() as u64).collect();
                    let expected: Vec<u64> = model.channel(channel).into_iter().take(n).collect();
                    prop_assert_eq!(&values, &expected);
                    let keys: Vec<_> = got.iter().map(|q| q.key).collect();
                    queue.remove(&keys).unwrap();
                    model.remove(channel, &values);
                }
                Op::Reopen => {
                    drop(queue);
                    queue = DurableQueue::open(&config(&dir), Metrics::new()).unwrap();
                }
            }
            prop_assert_eq!(queue.len(), model.items.len() as u64);
            prop_assert_eq!(queue.bytes(), model.bytes());
            prop_assert!(queue.bytes() <= MAX_BYTES);
        }
        for channel in 1..=4 {
            let values: Vec<u64> = queue
                .peek(common::ch(channel), usize::MAX)
                .unwrap()
                .iter()
                .map(|q| q.reading.value.as_f64().unwrap() as u64)
                .collect();
            prop_assert_eq!(values, model.channel(channel));
        }
    }
}
