//! Removing a delivered set atomically without a sled batch.
//!
//! The readings of one delivered update must leave the queue together: a
//! crash that kept half of them would send them again under the same
//! `created_at`. A sled 0.34 batch is atomic, but sled writes and syncs its log
//! buffer for every batch (twice: `pin_log` rolls the buffer before and after
//! reserving the batch's manifest), so one batch per delivered update was most
//! of the SD-card wear at 1 reading/s (`tsgw-bench wear`). A removal is
//! therefore plain single operations behind an intent record:
//!
//! 1. the intent: the keys, and the counts record that holds after the removal;
//! 2. each touched record removed, or rewritten with the readings it keeps;
//! 3. the counts record;
//! 4. the intent deleted.
//!
//! They wait in sled's log buffer for the next flush, like pushes. sled
//! recovers a prefix of its log, so after a crash either the intent is absent
//! (none of the removal survived; the readings are sent again and ThingSpeak's
//! unique `created_at` refuses the repeat) or it is there and opening the store
//! finishes the removal and stores the intent's counts before counting.
//!
//! Version 1 intents (keys only) come from older builds, which removed in
//! batches of [`REMOVE_CHUNK`] that each carried the counts record; opening
//! still finishes those after counting, as they expect.

use std::collections::BTreeSet;

use tsgw_core::QueueKey;

use crate::codec::{decode_key, decode_record, encode_key, encode_record, KEY_LEN};
use crate::occupancy::Counts;

/// Chunk size of a version 1 intent's removal, finished at open.
pub const REMOVE_CHUNK: usize = 1_000;

/// Key of the intent record. Shorter than a channel prefix (8 bytes), so no
/// channel's prefix scan can return it.
pub const INTENT_KEY: &[u8] = b"intent";
/// Keys only, removed in chunks that each carried the counts record (older builds).
const CHUNKED_VERSION: u8 = 1;
/// The counts record after the removal, then the keys; single operations.
const WHOLE_VERSION: u8 = 2;

/// A decoded intent record.
#[derive(Debug, PartialEq)]
pub enum Intent {
    /// Version 1: finish after counting, chunk by chunk with the counts record.
    Chunked(Vec<QueueKey>),
    /// Version 2: finish before counting, then store `counts_after` (an
    /// encoded counts record) as the counts record.
    Whole {
        counts_after: Vec<u8>,
        keys: Vec<QueueKey>,
    },
}

/// `u8 version (= 2) ++ u32 BE length ++ counts record ++ keys` (16 bytes each,
/// see `codec`).
pub fn encode(keys: &[QueueKey], counts_after: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + counts_after.len() + keys.len() * KEY_LEN);
    out.push(WHOLE_VERSION);
    out.extend_from_slice(&(counts_after.len() as u32).to_be_bytes());
    out.extend_from_slice(counts_after);
    for key in keys {
        out.extend_from_slice(&encode_key(*key));
    }
    out
}

/// A version 1 intent record, as older builds wrote it (tests of the upgrade).
#[cfg(test)]
pub fn encode_chunked(keys: &[QueueKey]) -> Vec<u8> {
    let mut out = vec![CHUNKED_VERSION];
    for key in keys {
        out.extend_from_slice(&encode_key(*key));
    }
    out
}

/// An intent record; the error says what is wrong.
pub fn decode(record: &[u8]) -> Result<Intent, String> {
    let (&version, rest) = record.split_first().ok_or("empty intent record")?;
    match version {
        CHUNKED_VERSION => decode_keys(rest).map(Intent::Chunked),
        WHOLE_VERSION => {
            let (len, rest) = rest
                .split_first_chunk::<4>()
                .ok_or("intent record too short for its counts length")?;
            let len = u32::from_be_bytes(*len) as usize;
            if rest.len() < len {
                return Err(format!(
                    "intent record's counts record ({len} bytes) is cut short"
                ));
            }
            let (counts_after, keys) = rest.split_at(len);
            Ok(Intent::Whole {
                counts_after: counts_after.to_vec(),
                keys: decode_keys(keys)?,
            })
        }
        other => Err(format!("unknown intent record version {other}")),
    }
}

fn decode_keys(keys: &[u8]) -> Result<Vec<QueueKey>, String> {
    if !keys.len().is_multiple_of(KEY_LEN) {
        return Err(format!(
            "intent record's keys ({} bytes) are not whole keys",
            keys.len()
        ));
    }
    keys.chunks_exact(KEY_LEN)
        .map(|k| decode_key(k).map_err(|e| e.to_string()))
        .collect()
}

/// The operations removing those of `keys` still stored, with what they do to
/// the records holding them.
pub struct Removal {
    /// Per touched record: its raw key, and the rewritten record or `None`
    /// (delete).
    ops: Vec<(sled::IVec, Option<Vec<u8>>)>,
    /// Each record touched, by its key, with the readings removed from it.
    pub records: Vec<(QueueKey, u64)>,
}

impl Removal {
    pub fn readings(&self) -> u64 {
        self.records.iter().map(|(_, n)| n).sum()
    }

    /// The operations as one sled batch (atomic by itself).
    pub fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (key, value) in self.ops {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch
    }

    /// Applies the operations one by one: each is atomic, the whole is not,
    /// so callers put them behind an intent record.
    pub fn apply_singly(self, tree: &sled::Tree) -> Result<(), sled::Error> {
        for (key, value) in self.ops {
            match value {
                Some(value) => tree.insert(key, value)?,
                None => tree.remove(key)?,
            };
        }
        Ok(())
    }
}

/// The operations removing those of `keys` still stored, with `counts` updated
/// to match. A record that loses all its readings is deleted; one that loses some
/// is rewritten under its key with the rest. Shared by the queue's removals
/// and by open finishing an interrupted one. A record that does not decode is
/// left alone: the next peek drops and counts it.
pub fn removal(
    tree: &sled::Tree,
    keys: &[QueueKey],
    counts: &mut Counts,
) -> Result<Removal, sled::Error> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    let mut removal = Removal {
        ops: Vec::new(),
        records: Vec::new(),
    };
    let mut i = 0;
    while let Some(&key) = keys.get(i) {
        i += 1;
        let Some((raw, value)) = record_holding(tree, key)? else {
            continue;
        };
        let Ok(record_key) = decode_key(&raw) else {
            continue;
        };
        let Ok(entries) = decode_record(record_key, &value) else {
            continue;
        };
        let last = entries.last().map_or(record_key.seq, |(k, _)| k.seq);
        let mut gone = BTreeSet::from([key.seq]);
        while let Some(next) = keys
            .get(i)
            .filter(|k| k.channel == key.channel && k.seq <= last)
        {
            gone.insert(next.seq);
            i += 1;
        }
        let (taken, kept): (Vec<_>, Vec<_>) =
            entries.iter().partition(|(k, _)| gone.contains(&k.seq));
        if taken.is_empty() {
            continue;
        }
        let old_bytes = (raw.len() + value.len()) as u64;
        let new_bytes = if kept.is_empty() {
            removal.ops.push((raw, None));
            0
        } else {
            let rest = encode_record(record_key.seq, kept.iter().map(|(k, r)| (k.seq, r)));
            let len = (KEY_LEN + rest.len()) as u64;
            removal.ops.push((raw, Some(rest)));
            len
        };
        counts.sub(
            key.channel,
            taken.len() as u64,
            old_bytes.saturating_sub(new_bytes),
        );
        removal.records.push((record_key, taken.len() as u64));
    }
    Ok(removal)
}

/// The stored record that would hold `key`: the channel's last key at or below
/// it (see `codec`). Whether it really holds `key` is up to its entries.
fn record_holding(
    tree: &sled::Tree,
    key: QueueKey,
) -> Result<Option<(sled::IVec, sled::IVec)>, sled::Error> {
    let first = encode_key(QueueKey {
        channel: key.channel,
        seq: 0,
    });
    tree.range(first..=encode_key(key)).next_back().transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsgw_core::ChannelId;

    #[test]
    fn round_trips_and_refuses_damage() {
        let keys: Vec<QueueKey> = (1..=3)
            .map(|seq| QueueKey {
                channel: ChannelId::new(seq + 10).unwrap(),
                seq,
            })
            .collect();
        let counts = b"counts record".to_vec();
        let record = encode(&keys, &counts);
        assert_eq!(
            decode(&record).unwrap(),
            Intent::Whole {
                counts_after: counts.clone(),
                keys: keys.clone()
            }
        );
        assert!(decode(&[]).is_err());
        assert!(decode(&record[..record.len() - 1]).is_err());
        assert!(decode(&record[..3]).is_err());
        assert!(decode(&record[..5 + counts.len() - 1]).is_err());
        assert!(decode(&[9]).is_err());
        assert_eq!(
            decode(&[WHOLE_VERSION, 0, 0, 0, 0]).unwrap(),
            Intent::Whole {
                counts_after: vec![],
                keys: vec![]
            }
        );
        // Older builds' intents still decode.
        let chunked = encode_chunked(&keys);
        assert_eq!(decode(&chunked).unwrap(), Intent::Chunked(keys));
        assert!(decode(&chunked[..chunked.len() - 1]).is_err());
    }
}
