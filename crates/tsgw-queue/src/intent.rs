//! Removing a large delivered set in chunks without losing atomicity.
//!
//! One delivered update can cover thousands of readings, and they must leave
//! the queue together: a crash that kept half of them would send them again
//! under the same `created_at`. One sled batch of 10,000 removals is atomic but
//! costly (draining a million-reading backlog peaked ~30 MB higher than with
//! batches of 1,000), so a large removal first stores its keys under
//! [`INTENT_KEY`], removes them in chunks, then deletes the intent. sled
//! recovers a prefix of its log, so after a crash either the intent is gone
//! (all chunks done) or it is there and opening the store finishes the job.

use std::collections::BTreeSet;

use tsgw_core::QueueKey;

use crate::codec::{decode_key, decode_record, encode_key, encode_record, KEY_LEN};
use crate::occupancy::Counts;

/// Removals of more keys than this go in chunks behind an intent record.
pub const REMOVE_CHUNK: usize = 1_000;

/// Key of the intent record. Shorter than a channel prefix (8 bytes), so no
/// channel's prefix scan can return it.
pub const INTENT_KEY: &[u8] = b"intent";
const INTENT_VERSION: u8 = 1;

/// `u8 version (= 1) ++ keys` (16 bytes each, see `codec`).
pub fn encode(keys: &[QueueKey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + keys.len() * KEY_LEN);
    out.push(INTENT_VERSION);
    for key in keys {
        out.extend_from_slice(&encode_key(*key));
    }
    out
}

/// The keys of an intent record; the error says what is wrong.
pub fn decode(record: &[u8]) -> Result<Vec<QueueKey>, String> {
    let (&version, keys) = record.split_first().ok_or("empty intent record")?;
    if version != INTENT_VERSION {
        return Err(format!("unknown intent record version {version}"));
    }
    if keys.len() % KEY_LEN != 0 {
        return Err(format!(
            "intent record length {} is not whole keys",
            record.len()
        ));
    }
    keys.chunks_exact(KEY_LEN)
        .map(|k| decode_key(k).map_err(|e| e.to_string()))
        .collect()
}

/// A batch removing those of `keys` still stored, with what it does to the
/// records holding them.
pub struct Removal {
    pub batch: sled::Batch,
    /// Each record touched, by its key, with the readings removed from it.
    pub records: Vec<(QueueKey, u64)>,
}

impl Removal {
    pub fn readings(&self) -> u64 {
        self.records.iter().map(|(_, n)| n).sum()
    }
}

/// One batch removing those of `keys` still stored, with `counts` updated to
/// match. A record that loses all its readings is deleted; one that loses some
/// is rewritten under its key with the rest. Shared by the queue's removals
/// and by open finishing an interrupted one. A record that does not decode is
/// left alone: the next peek drops and counts it.
pub fn removal_batch(
    tree: &sled::Tree,
    keys: &[QueueKey],
    counts: &mut Counts,
) -> Result<Removal, sled::Error> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    let mut removal = Removal {
        batch: sled::Batch::default(),
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
            removal.batch.remove(raw);
            0
        } else {
            let rest = encode_record(record_key.seq, kept.iter().map(|(k, r)| (k.seq, r)));
            let len = (KEY_LEN + rest.len()) as u64;
            removal.batch.insert(raw, rest);
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
        let record = encode(&keys);
        assert_eq!(decode(&record).unwrap(), keys);
        assert!(decode(&[]).is_err());
        assert!(decode(&record[..record.len() - 1]).is_err());
        assert!(decode(&[9]).is_err());
        assert_eq!(decode(&[INTENT_VERSION]).unwrap(), vec![]);
    }
}
