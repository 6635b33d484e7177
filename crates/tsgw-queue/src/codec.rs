//! The on-disk layout of one queued reading: its key and its value.
//!
//! # Key (16 bytes)
//! `channel id (u64 big-endian) ++ seq (u64 big-endian)`. Big-endian makes sled's
//! byte order equal numeric order, so a prefix scan over one channel yields its
//! readings oldest first, and `channels()` order is ascending channel id.
//!
//! # Value (format version 1)
//! ```text
//! u8      format version (= 1)
//! u8      target: 1..=8 field1..field8, 9 status, 10 lat, 11 long, 12 elevation
//! varint  measured_at seconds since the Unix epoch (zigzag, so dates before 1970 work)
//! varint  measured_at sub-second nanoseconds
//! u8      value kind: 0 number, then f64 little-endian (8 bytes)
//!                     1 text, then varint length ++ UTF-8 bytes
//! u8      source: 0 mqtt, 1 serial, 2 modbus
//! varint  device name length ++ UTF-8 bytes
//! ```
//! The channel is not repeated in the value: the key carries it.
//!
//! Size: a numeric reading from device `esp-kitchen` with a millisecond
//! timestamp is 33 bytes of value + 16 of key = 49 bytes; the same reading as
//! JSON is about 130 bytes of value. `cargo bench -p tsgw-queue` prints the
//! measured figure. Decoding is strict (known version, known tags, valid
//! UTF-8, no trailing bytes) so a damaged value is reported rather than
//! misread.

use chrono::{DateTime, Utc};
use tsgw_core::{ChannelId, Field, Origin, QueueKey, Reading, SourceKind, Target, Value};

/// Bumped whenever the value layout changes; old versions stay decodable.
pub const FORMAT_VERSION: u8 = 1;

/// Length of an encoded key.
pub const KEY_LEN: usize = 16;

/// Why a stored value could not be turned back into a reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty value")]
    Empty,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("value ends early (reading {0})")]
    Truncated(&'static str),
    #[error("unknown target tag {0}")]
    BadTarget(u8),
    #[error("timestamp out of range")]
    BadTimestamp,
    #[error("unknown value kind {0}")]
    BadValueKind(u8),
    #[error("unknown source tag {0}")]
    BadSource(u8),
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    #[error("varint too long (reading {0})")]
    BadVarint(&'static str),
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    #[error("key is not 16 bytes with a non-zero channel id")]
    BadKey,
}

pub fn encode_key(key: QueueKey) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    out[..8].copy_from_slice(&key.channel.get().to_be_bytes());
    out[8..].copy_from_slice(&key.seq.to_be_bytes());
    out
}

pub fn decode_key(bytes: &[u8]) -> Result<QueueKey, DecodeError> {
    let (ch, seq) = match (bytes.get(..8), bytes.get(8..)) {
        (Some(ch), Some(seq)) if bytes.len() == KEY_LEN => (ch, seq),
        _ => return Err(DecodeError::BadKey),
    };
    let ch = u64::from_be_bytes(ch.try_into().map_err(|_| DecodeError::BadKey)?);
    let seq = u64::from_be_bytes(seq.try_into().map_err(|_| DecodeError::BadKey)?);
    let channel = ChannelId::new(ch).map_err(|_| DecodeError::BadKey)?;
    Ok(QueueKey { channel, seq })
}

/// Whether `key` names one of the queue's own records (counts, removal
/// intent) rather than a reading: those keys are shorter than a channel
/// prefix, so channel scans never meet them.
pub fn is_meta_key(key: &[u8]) -> bool {
    key.len() < 8
}

/// The 8-byte prefix shared by every key of `channel`.
pub fn channel_prefix(channel: ChannelId) -> [u8; 8] {
    channel.get().to_be_bytes()
}

pub fn encode_value(reading: &Reading) -> Vec<u8> {
    let device = reading.origin.device.as_bytes();
    let mut out = Vec::with_capacity(24 + device.len());
    out.push(FORMAT_VERSION);
    out.push(target_tag(reading.target));
    put_varint(&mut out, zigzag(reading.measured_at.timestamp()));
    put_varint(
        &mut out,
        u64::from(reading.measured_at.timestamp_subsec_nanos()),
    );
    match &reading.value {
        Value::Number(n) => {
            out.push(0);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Value::Text(s) => {
            out.push(1);
            put_bytes(&mut out, s.as_bytes());
        }
    }
    out.push(match reading.origin.source {
        SourceKind::Mqtt => 0,
        SourceKind::Serial => 1,
        SourceKind::Modbus => 2,
    });
    put_bytes(&mut out, device);
    out
}

pub fn decode_value(channel: ChannelId, bytes: &[u8]) -> Result<Reading, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8("version").map_err(|_| DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let target = target_from_tag(r.u8("target")?)?;
    let secs = unzigzag(r.varint("timestamp")?);
    let nanos = u32::try_from(r.varint("timestamp")?).map_err(|_| DecodeError::BadTimestamp)?;
    let measured_at =
        DateTime::<Utc>::from_timestamp(secs, nanos).ok_or(DecodeError::BadTimestamp)?;
    let value = match r.u8("value kind")? {
        0 => Value::Number(f64::from_le_bytes(r.array::<8>("number")?)),
        1 => Value::Text(r.string("text value")?),
        other => return Err(DecodeError::BadValueKind(other)),
    };
    let source = match r.u8("source")? {
        0 => SourceKind::Mqtt,
        1 => SourceKind::Serial,
        2 => SourceKind::Modbus,
        other => return Err(DecodeError::BadSource(other)),
    };
    let device = r.string("device name")?;
    let rest = bytes.len() - r.pos;
    if rest != 0 {
        return Err(DecodeError::TrailingBytes(rest));
    }
    Ok(Reading {
        channel,
        target,
        value,
        measured_at,
        origin: Origin { source, device },
    })
}

/// Reads only what `oldest()` needs, without allocating the strings.
pub fn decode_measured_at(bytes: &[u8]) -> Result<DateTime<Utc>, DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    let version = r.u8("version").map_err(|_| DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    target_from_tag(r.u8("target")?)?;
    let secs = unzigzag(r.varint("timestamp")?);
    let nanos = u32::try_from(r.varint("timestamp")?).map_err(|_| DecodeError::BadTimestamp)?;
    DateTime::<Utc>::from_timestamp(secs, nanos).ok_or(DecodeError::BadTimestamp)
}

fn target_tag(target: Target) -> u8 {
    match target {
        Target::Field(f) => f.get(),
        Target::Status => 9,
        Target::Latitude => 10,
        Target::Longitude => 11,
        Target::Elevation => 12,
    }
}

fn target_from_tag(tag: u8) -> Result<Target, DecodeError> {
    Ok(match tag {
        1..=8 => Target::Field(Field::new(tag).map_err(|_| DecodeError::BadTarget(tag))?),
        9 => Target::Status,
        10 => Target::Latitude,
        11 => Target::Longitude,
        12 => Target::Elevation,
        other => return Err(DecodeError::BadTarget(other)),
    })
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// LEB128: 7 bits per byte, high bit set on all but the last byte.
fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or(DecodeError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let slice = self.take(N, what)?;
        slice.try_into().map_err(|_| DecodeError::Truncated(what))
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Truncated(what))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(DecodeError::Truncated(what))?;
        self.pos = end;
        Ok(slice)
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let bits = u64::from(b & 0x7f);
            // The 10th byte may only carry the top bit of a u64.
            if shift == 63 && bits > 1 {
                return Err(DecodeError::BadVarint(what));
            }
            n |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError::BadVarint(what))
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = usize::try_from(self.varint(what)?).map_err(|_| DecodeError::Truncated(what))?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reading(value: Value, device: &str) -> Reading {
        Reading {
            channel: ChannelId::new(1_234_567).unwrap(),
            target: Target::Field(Field::new(3).unwrap()),
            value,
            measured_at: DateTime::from_timestamp(1_764_000_000, 123_000_000).unwrap(),
            origin: Origin::new(SourceKind::Mqtt, device),
        }
    }

    #[test]
    fn keys_sort_by_channel_then_seq() {
        let k = |c, s| {
            encode_key(QueueKey {
                channel: ChannelId::new(c).unwrap(),
                seq: s,
            })
        };
        assert!(k(1, u64::MAX) < k(2, 0));
        assert!(k(2, 255) < k(2, 256));
        let key = QueueKey {
            channel: ChannelId::new(99).unwrap(),
            seq: 7,
        };
        assert_eq!(decode_key(&encode_key(key)).unwrap(), key);
        assert_eq!(decode_key(&[0; 16]), Err(DecodeError::BadKey));
        assert_eq!(decode_key(&[1; 15]), Err(DecodeError::BadKey));
    }

    #[test]
    fn numeric_reading_is_compact() {
        let r = reading(Value::Number(21.5), "esp-kitchen");
        let bytes = encode_value(&r);
        assert_eq!(bytes.len(), 33, "documented size changed");
        assert_eq!(decode_value(r.channel, &bytes).unwrap(), r);
        let json = serde_json_len(&r);
        assert!(json > 3 * bytes.len(), "json {json} vs {}", bytes.len());
    }

    fn serde_json_len(r: &Reading) -> usize {
        // Rough JSON size for the doc comment's comparison, without a serde_json dependency.
        format!(
            r#"{{"channel":{},"target":"{}","value":{},"measured_at":"{}","origin":{{"source":"{}","device":"{}"}}}}"#,
            r.channel,
            r.target,
            r.value,
            r.measured_at.to_rfc3339(),
            r.origin.source,
            r.origin.device
        )
        .len()
    }

    #[test]
    fn damaged_values_are_errors_not_panics() {
        let good = encode_value(&reading(Value::Text("on".into()), "d"));
        let ch = ChannelId::new(1).unwrap();
        assert_eq!(decode_value(ch, &[]), Err(DecodeError::Empty));
        assert_eq!(decode_value(ch, &[9]), Err(DecodeError::UnknownVersion(9)));
        assert_eq!(decode_value(ch, &[1, 13]), Err(DecodeError::BadTarget(13)));
        for cut in 1..good.len() {
            assert!(decode_value(ch, &good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            decode_value(ch, &trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        let endless_varint = [
            1u8, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode_value(ch, &endless_varint).is_err());
    }

    fn arb_reading() -> impl Strategy<Value = Reading> {
        let target = prop_oneof![
            (1u8..=8).prop_map(|n| Target::Field(Field::new(n).unwrap())),
            Just(Target::Status),
            Just(Target::Latitude),
            Just(Target::Longitude),
            Just(Target::Elevation),
        ];
        let value = prop_oneof![
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::Number),
            ".{0,40}".prop_map(Value::Text),
        ];
        let source = prop_oneof![
            Just(SourceKind::Mqtt),
            Just(SourceKind::Serial),
            Just(SourceKind::Modbus)
        ];
        (
            1u64..,
            target,
            value,
            -10_000_000_000i64..10_000_000_000,
            0u32..1_000_000_000,
            source,
            ".{0,30}",
        )
            .prop_map(|(ch, target, value, secs, nanos, source, device)| Reading {
                channel: ChannelId::new(ch).unwrap(),
                target,
                value,
                measured_at: DateTime::from_timestamp(secs, nanos).unwrap(),
                origin: Origin::new(source, device),
            })
    }

    proptest! {
        #[test]
        fn every_reading_round_trips(r in arb_reading()) {
            let bytes = encode_value(&r);
            prop_assert_eq!(decode_value(r.channel, &bytes).unwrap(), r.clone());
            prop_assert_eq!(decode_measured_at(&bytes).unwrap(), r.measured_at);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_value(ChannelId::new(1).unwrap(), &bytes);
            let _ = decode_measured_at(&bytes);
        }
    }
}
