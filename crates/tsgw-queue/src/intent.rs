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

use tsgw_core::QueueKey;

use crate::codec::{decode_key, encode_key, KEY_LEN};
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

/// One batch removing those of `keys` still stored, with `counts` updated to
/// match; also returns the keys it removes. Shared by the queue's removals
/// and by open finishing an interrupted one.
pub fn removal_batch(
    tree: &sled::Tree,
    keys: &[QueueKey],
    counts: &mut Counts,
) -> Result<(sled::Batch, Vec<QueueKey>), sled::Error> {
    let mut batch = sled::Batch::default();
    let mut removed = Vec::new();
    for key in keys {
        let raw = encode_key(*key);
        if let Some(v) = tree.get(raw)? {
            counts.sub(key.channel, (KEY_LEN + v.len()) as u64);
            batch.remove(&raw[..]);
            removed.push(*key);
        }
    }
    Ok((batch, removed))
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
