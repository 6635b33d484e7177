//! Counts of what the store holds, so `len`, `bytes` and `channels` never scan
//! the store (sled's own `len()` walks the whole tree).
//!
//! The counts live in memory and, as one record under [`COUNTS_KEY`], in the
//! readings tree itself, so opening a big backlog needs no scan. That matters
//! on a Pi: scanning a million-reading store pulls every page through sled's
//! cache and left ~27 MB resident (measured on x86-64).
//!
//! The record is exact after any crash without being rewritten on every push
//! (which would cost a sled batch per push, 3-12x the bytes written per flush:
//! SD wear). It says what the store held when the highest seq handed out was
//! `covered_seq`, and is written
//! - in the same atomic batch as every removal (delivery, eviction, corrupt
//!   entry), so no removal survives a crash without the record that counts it;
//! - before every flush, so it is at most one flush interval old.
//!
//! Pushes after it carry higher seqs; opening adds them with a short range
//! scan of each channel above `covered_seq`. This relies on sled recovering a
//! prefix of its log: a recovered record implies every write before it.
//!
//! # Record layout (version 1)
//! `u8 version (= 1) ++ covered_seq u64 ++ per channel, ascending: channel u64
//! ++ readings u64 ++ bytes u64` (all big-endian).

use std::collections::BTreeMap;

use tsgw_core::ChannelId;

/// Readings and bytes of one channel, or of the whole queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub readings: u64,
    /// Encoded key + value bytes.
    pub bytes: u64,
}

/// Per-channel and total occupancy. Only channels with readings are listed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    per_channel: BTreeMap<ChannelId, Occupancy>,
    total: Occupancy,
}

impl Counts {
    /// `readings` more readings of `channel`, taking `bytes` more on disk.
    pub fn add(&mut self, channel: ChannelId, readings: u64, bytes: u64) {
        let c = self.per_channel.entry(channel).or_default();
        c.readings += readings;
        c.bytes += bytes;
        self.total.readings += readings;
        self.total.bytes += bytes;
    }

    /// Saturating, so a bookkeeping slip can never wrap the gauges to 2^64.
    pub fn sub(&mut self, channel: ChannelId, readings: u64, bytes: u64) {
        if let Some(c) = self.per_channel.get_mut(&channel) {
            c.readings = c.readings.saturating_sub(readings);
            c.bytes = c.bytes.saturating_sub(bytes);
            if c.readings == 0 {
                self.per_channel.remove(&channel);
            }
        }
        self.total.readings = self.total.readings.saturating_sub(readings);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
    }

    pub fn total(&self) -> Occupancy {
        self.total
    }

    /// Readings and bytes of one channel (zero when it has none).
    pub fn of(&self, channel: ChannelId) -> Occupancy {
        self.per_channel.get(&channel).copied().unwrap_or_default()
    }

    /// Channels with readings, ascending.
    pub fn channels(&self) -> Vec<ChannelId> {
        self.per_channel.keys().copied().collect()
    }

    /// The record stored under [`COUNTS_KEY`]: these counts cover every
    /// reading with a seq up to `covered_seq`.
    pub fn encode(&self, covered_seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.per_channel.len() * ENTRY_LEN);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&covered_seq.to_be_bytes());
        for (channel, occ) in &self.per_channel {
            out.extend_from_slice(&channel.get().to_be_bytes());
            out.extend_from_slice(&occ.readings.to_be_bytes());
            out.extend_from_slice(&occ.bytes.to_be_bytes());
        }
        out
    }

    /// Parses a record written by [`Counts::encode`] into the counts and
    /// their `covered_seq`; the error says what is wrong.
    pub fn decode(record: &[u8]) -> Result<(Counts, u64), String> {
        let (&version, rest) = record.split_first().ok_or("empty record")?;
        if version != RECORD_VERSION {
            return Err(format!("unknown record version {version}"));
        }
        let (covered, entries) = rest
            .split_first_chunk::<8>()
            .ok_or("record ends before its covered seq")?;
        if entries.len() % ENTRY_LEN != 0 {
            return Err(format!(
                "record length {} is not whole entries",
                record.len()
            ));
        }
        let mut counts = Counts::default();
        for entry in entries.chunks_exact(ENTRY_LEN) {
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&entry[i * 8..(i + 1) * 8]);
                u64::from_be_bytes(b)
            };
            let channel = ChannelId::new(word(0)).map_err(|e| e.to_string())?;
            let occ = Occupancy {
                readings: word(1),
                bytes: word(2),
            };
            if occ.readings == 0 || counts.per_channel.insert(channel, occ).is_some() {
                return Err(format!("bad entry for channel {channel}"));
            }
            counts.total.readings = counts.total.readings.saturating_add(occ.readings);
            counts.total.bytes = counts.total.bytes.saturating_add(occ.bytes);
        }
        Ok((counts, u64::from_be_bytes(*covered)))
    }
}

/// Key of the counts record in the readings tree. Shorter than a channel
/// prefix (8 bytes), so no channel's prefix scan can ever return it.
pub const COUNTS_KEY: &[u8] = b"counts";
const RECORD_VERSION: u8 = 1;
const ENTRY_LEN: usize = 24;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_disappear_when_emptied() {
        let a = ChannelId::new(2).unwrap();
        let b = ChannelId::new(1).unwrap();
        let mut c = Counts::default();
        c.add(a, 1, 40);
        c.add(b, 1, 30);
        c.add(a, 1, 40);
        assert_eq!(c.channels(), vec![b, a]);
        assert_eq!(c.of(a).readings, 2);
        assert_eq!(c.of(ChannelId::new(3).unwrap()), Occupancy::default());
        assert_eq!(
            c.total(),
            Occupancy {
                readings: 3,
                bytes: 110
            }
        );
        c.sub(b, 1, 30);
        assert_eq!(c.channels(), vec![a]);
        c.sub(a, 1, 40);
        c.sub(a, 1, 40);
        c.sub(a, 1, 40);
        assert_eq!(c.total(), Occupancy::default());
        assert!(c.channels().is_empty());
    }

    #[test]
    fn the_record_round_trips() {
        let mut c = Counts::default();
        assert_eq!(Counts::decode(&c.encode(0)).unwrap(), (c.clone(), 0));
        c.add(ChannelId::new(7).unwrap(), 1, 49);
        c.add(ChannelId::new(u64::MAX).unwrap(), 1, 60);
        c.add(ChannelId::new(7).unwrap(), 1, 51);
        let (back, covered) = Counts::decode(&c.encode(u64::MAX)).unwrap();
        assert_eq!(covered, u64::MAX);
        assert_eq!(back, c);
        assert_eq!(back.total(), c.total());
    }

    #[test]
    fn damaged_records_are_refused() {
        let mut c = Counts::default();
        c.add(ChannelId::new(7).unwrap(), 1, 49);
        let good = c.encode(3);
        assert!(Counts::decode(&[]).is_err());
        assert!(Counts::decode(&good[..5]).is_err());
        assert!(Counts::decode(&good[..good.len() - 1]).is_err());
        let mut bad_version = good.clone();
        bad_version[0] = 9;
        assert!(Counts::decode(&bad_version).is_err());
        let mut zero_channel = good.clone();
        zero_channel[9..17].fill(0);
        assert!(Counts::decode(&zero_channel).is_err());
        let mut twice = good.clone();
        twice.extend_from_slice(&good[9..]);
        assert!(Counts::decode(&twice).is_err());
    }
}
