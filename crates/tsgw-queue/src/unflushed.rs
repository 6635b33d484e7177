//! The readings pushed since the last successful flush: the ones a failing
//! disk can still take away.
//!
//! sled accepts a push into memory; if the next flush fails (disk full, I/O
//! error) the queue reopens the store from disk, and whatever had not reached
//! it is gone. Remembering these records (and how many readings each still
//! holds) lets the reopen find out exactly which readings were lost, so they
//! are counted and logged like every other drop instead of vanishing. The set
//! stays small: it only spans one flush interval (pushes fail while the store
//! is failed).

use std::collections::BTreeMap;

use tsgw_core::{ChannelId, QueueKey};

#[derive(Debug, Default)]
pub struct Unflushed {
    /// Record seq → (channel, readings it still holds). Seqs are unique
    /// across channels.
    by_seq: BTreeMap<u64, (ChannelId, u64)>,
}

impl Unflushed {
    /// A record of `readings` readings was stored under `key`.
    pub fn pushed(&mut self, key: QueueKey, readings: u64) {
        self.by_seq.insert(key.seq, (key.channel, readings));
    }

    /// `readings` of the record under `key` were removed (delivered) or
    /// evicted: no longer readings the disk can lose.
    pub fn gone(&mut self, key: QueueKey, readings: u64) {
        if let Some((_, left)) = self.by_seq.get_mut(&key.seq) {
            *left = left.saturating_sub(readings);
            if *left == 0 {
                self.by_seq.remove(&key.seq);
            }
        }
    }

    /// A flush that started when `mark` was the highest seq handed out has
    /// succeeded: everything up to it is on disk.
    pub fn flushed_through(&mut self, mark: u64) {
        match mark.checked_add(1) {
            Some(first_unflushed) => self.by_seq = self.by_seq.split_off(&first_unflushed),
            None => self.by_seq.clear(),
        }
    }

    /// Empties the set, returning its record keys (oldest first) with the
    /// readings each still holds.
    pub fn take(&mut self) -> Vec<(QueueKey, u64)> {
        std::mem::take(&mut self.by_seq)
            .into_iter()
            .map(|(seq, (channel, n))| (QueueKey { channel, seq }, n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> QueueKey {
        QueueKey {
            channel: ChannelId::new(1 + seq % 2).unwrap(),
            seq,
        }
    }

    #[test]
    fn only_readings_after_the_last_good_flush_remain() {
        let mut u = Unflushed::default();
        for seq in 1..=10 {
            u.pushed(key(seq), 3);
        }
        u.gone(key(9), 3);
        u.gone(key(8), 1);
        u.flushed_through(6);
        assert_eq!(u.take(), vec![(key(7), 3), (key(8), 2), (key(10), 3)]);
        assert!(u.take().is_empty());
        u.pushed(key(11), 1);
        u.pushed(key(u64::MAX), 1);
        u.flushed_through(u64::MAX);
        assert!(u.take().is_empty());
    }
}
