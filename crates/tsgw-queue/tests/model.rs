//! Property test: any sequence of pushes, removals and reopens leaves the queue
//! exactly where a simple in-memory model says: same readings, same order per
//! channel, same byte count, oldest-first eviction (of whole records) across
//! channels.

mod common;

use std::collections::VecDeque;

use proptest::prelude::*;
use tsgw_core::{Metrics, Reading, ReadingStore};
use tsgw_queue::codec::{encode_record, KEY_LEN};
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

/// One stored record as the model sees it: a push's readings of one channel,
/// each with its offset from the record's key.
struct Record {
    channel: u64,
    entries: Vec<(u64, Reading)>,
}

impl Record {
    fn bytes(&self) -> u64 {
        let value = encode_record(0, self.entries.iter().map(|(off, r)| (*off, r)));
        (KEY_LEN + value.len()) as u64
    }
}

/// Queue contents in push order, as records (see tsgw_queue::codec).
#[derive(Default)]
struct Model {
    records: VecDeque<Record>,
}

fn value(r: &Reading) -> u64 {
    r.value.as_f64().unwrap() as u64
}

impl Model {
    fn bytes(&self) -> u64 {
        self.records.iter().map(Record::bytes).sum()
    }

    fn len(&self) -> u64 {
        self.records.iter().map(|r| r.entries.len() as u64).sum()
    }

    /// One record per channel, in the order the channels first appear.
    fn push(&mut self, batch: &[Reading]) {
        let mut add: Vec<Record> = Vec::new();
        for r in batch {
            let channel = r.channel.get();
            match add.iter_mut().find(|rec| rec.channel == channel) {
                Some(rec) => rec.entries.push((rec.entries.len() as u64, r.clone())),
                None => add.push(Record {
                    channel,
                    entries: vec![(0, r.clone())],
                }),
            }
        }
        let need: u64 = add.iter().map(Record::bytes).sum();
        // Eviction takes whole records, oldest first.
        while self.bytes() + need > MAX_BYTES {
            self.records.pop_front();
        }
        self.records.extend(add);
    }

    fn channel(&self, channel: u64) -> Vec<u64> {
        self.records
            .iter()
            .filter(|rec| rec.channel == channel)
            .flat_map(|rec| rec.entries.iter().map(|(_, r)| value(r)))
            .collect()
    }

    /// A record that keeps some readings keeps their offsets.
    fn remove(&mut self, channel: u64, values: &[u64]) {
        for rec in self.records.iter_mut().filter(|rec| rec.channel == channel) {
            rec.entries.retain(|(_, r)| !values.contains(&value(r)));
        }
        self.records.retain(|rec| !rec.entries.is_empty());
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
            prop_assert_eq!(queue.len(), model.len());
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
