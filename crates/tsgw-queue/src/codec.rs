//! The on-disk layout of one queued reading: its key and its value.
//!
//! # Key (16 bytes)
//! `channel id (u64 big-endian) ++ seq (u64 big-endian)`. Big-endian makes sled's
//! byte order equal numeric order, so a prefix scan over one channel yields its
//! readings oldest first, and `channels()` order is ascending channel id.
//!
//! # Value: a record of readings (format version 2)
//! One value holds the readings of one channel from one push (a writer batch),
//! so a burst of a million readings is a few thousand sled entries, not a
//! million: sled's per-entry costs (a node copy per insert, page metadata kept
//! resident for the whole log) dominated the gateway's CPU and memory.
//! ```text
//! u8      format version (= 2)
//! u32     CRC-32 (IEEE, little-endian) of every byte after it
//! varint  number of readings n (>= 1)
//! varint  number of devices d, then d times:
//!           u8 source (0 mqtt, 1 serial, 2 modbus) ++ varint length ++ UTF-8 name
//! n times:
//!   varint  seq - key seq (strictly increasing)
//!   u8      target: 1..=8 field1..field8, 9 status, 10 lat, 11 long, 12 elevation
//!   varint  device index (into the devices above)
//!   varint  measured_at seconds minus the previous reading's (zigzag; the
//!           first is relative to 0)
//!   varint  measured_at sub-second nanoseconds
//!   u8      value kind: 0 number, then f64 little-endian (8 bytes)
//!                       1 text, then varint length ++ UTF-8 bytes
//!                       2 whole number (|n| <= 2^53, not -0), then zigzag varint
//! ```
//! A reading's own seq ([`QueueKey::seq`]) is the key's seq plus its offset.
//! The key's seq is the first reading's when the record is written; removing
//! some readings of a record rewrites it under the same key with the rest, so
//! the record holding a seq is always the channel's last key at or below it.
//!
//! Size: in a record of many readings from one device, a reading with a
//! millisecond timestamp takes 17 bytes with a fractional value and 11 with a
//! whole one (a counter, a register), plus ~24 bytes per record; the same
//! reading as JSON is about 130 bytes, and the first release's one-reading
//! entries took 49. Smaller records are fewer bytes written to an SD card and,
//! since sled keeps what was written lately in memory, a smaller resident set
//! during a burst.
//!
//! # Format version 1 (read, never written)
//! `u8 version (= 1) ++ u8 target ++ varint seconds (zigzag) ++ varint
//! nanoseconds ++ value (kinds 0 and 1) ++ u8 source ++ varint length ++
//! device name`: one reading per entry, no checksum, written by tsgw before
//! records. Such a value reads as a record of one
//! reading whose seq is the key's, so an old backlog drains after an upgrade.
//!
//! The channel is not repeated in the value: the key carries it.
//!
//! Decoding is strict (known version, known tags, valid UTF-8, no trailing
//! bytes) and checksummed, so a damaged value is reported rather than misread.

use chrono::{DateTime, Utc};
use tsgw_core::{ChannelId, Field, Origin, QueueKey, Reading, SourceKind, Target, Value};

/// Bumped whenever the value layout changes; old versions stay decodable.
pub const FORMAT_VERSION: u8 = 2;
/// The one-reading layout of the first release (see the module docs).
const LEGACY_VERSION: u8 = 1;
/// Readings per record at most: a removal that takes part of a record
/// rewrites the rest, so records stay small enough for that to be cheap.
pub const MAX_RECORD_READINGS: usize = 512;

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
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("record holds no readings")]
    EmptyRecord,
    #[error("reading offsets are not increasing")]
    BadOffset,
    #[error("device index out of range")]
    BadDevice,
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

/// The record stored under `key_seq` holding `(seq, reading)` entries, all
/// of one channel, seqs strictly increasing and none below `key_seq`.
pub fn encode_record<'a>(
    key_seq: u64,
    entries: impl ExactSizeIterator<Item = (u64, &'a Reading)> + Clone,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + entries.len() * 16);
    put_varint(&mut body, entries.len() as u64);
    // The devices, each once; readings name them by index.
    let mut devices: Vec<(SourceKind, &str)> = Vec::new();
    for (_, r) in entries.clone() {
        let origin = (r.origin.source, r.origin.device.as_str());
        if !devices.contains(&origin) {
            devices.push(origin);
        }
    }
    put_varint(&mut body, devices.len() as u64);
    for (source, device) in &devices {
        body.push(source_tag(*source));
        put_bytes(&mut body, device.as_bytes());
    }
    let mut prev_secs = 0i64;
    for (seq, r) in entries {
        debug_assert!(seq >= key_seq, "a record's readings sort after its key");
        put_varint(&mut body, seq.saturating_sub(key_seq));
        body.push(target_tag(r.target));
        let device = devices
            .iter()
            .position(|d| *d == (r.origin.source, r.origin.device.as_str()))
            .unwrap_or_default();
        put_varint(&mut body, device as u64);
        let secs = r.measured_at.timestamp();
        put_varint(&mut body, zigzag(secs.wrapping_sub(prev_secs)));
        prev_secs = secs;
        put_varint(&mut body, u64::from(r.measured_at.timestamp_subsec_nanos()));
        put_value(&mut body, &r.value);
    }
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The stored size of one reading alone in a record (key included): what the
/// queue charges a push against `max_bytes` before it has built the records.
pub fn single_reading_len(reading: &Reading) -> usize {
    encode_record(0, std::iter::once((0, reading))).len() + KEY_LEN
}

/// Every reading of the record stored under `key`, with its own key.
pub fn decode_record(key: QueueKey, bytes: &[u8]) -> Result<Vec<(QueueKey, Reading)>, DecodeError> {
    let (n, mut r) = open_record(bytes)?;
    if n == 0 {
        // The legacy layout: one reading, the key's own.
        let mut r = Reader { bytes, pos: 1 };
        let reading = read_legacy_reading(&mut r, key.channel)?;
        r.finish()?;
        return Ok(vec![(key, reading)]);
    }
    let devices = read_devices(&mut r)?;
    let mut out = Vec::with_capacity(n.min(MAX_RECORD_READINGS as u64 * 2) as usize);
    let mut last: Option<u64> = None;
    let mut prev_secs = 0i64;
    for _ in 0..n {
        let offset = r.varint("offset")?;
        if last.is_some_and(|l| offset <= l) {
            return Err(DecodeError::BadOffset);
        }
        last = Some(offset);
        let seq = key.seq.checked_add(offset).ok_or(DecodeError::BadOffset)?;
        let target = target_from_tag(r.u8("target")?)?;
        let device = usize::try_from(r.varint("device index")?)
            .ok()
            .and_then(|i| devices.get(i))
            .ok_or(DecodeError::BadDevice)?;
        let secs = prev_secs.wrapping_add(unzigzag(r.varint("timestamp")?));
        prev_secs = secs;
        let nanos = u32::try_from(r.varint("timestamp")?).map_err(|_| DecodeError::BadTimestamp)?;
        let measured_at =
            DateTime::<Utc>::from_timestamp(secs, nanos).ok_or(DecodeError::BadTimestamp)?;
        let value = read_value(&mut r)?;
        let reading = Reading {
            channel: key.channel,
            target,
            value,
            measured_at,
            origin: Origin {
                source: device.0,
                device: device.1.clone(),
            },
        };
        out.push((
            QueueKey {
                channel: key.channel,
                seq,
            },
            reading,
        ));
    }
    r.finish()?;
    Ok(out)
}

fn read_devices(r: &mut Reader<'_>) -> Result<Vec<(SourceKind, String)>, DecodeError> {
    let count = r.varint("device count")?;
    // Each device takes at least two bytes: a damaged count cannot allocate much.
    let mut devices = Vec::with_capacity(count.min(r.remaining() as u64 / 2) as usize);
    for _ in 0..count {
        let source = source_from_tag(r.u8("source")?)?;
        devices.push((source, r.string("device name")?));
    }
    Ok(devices)
}

/// How many readings a stored value holds, checking its checksum but not
/// decoding the readings (opening a store counts with this).
pub fn record_len(bytes: &[u8]) -> Result<u64, DecodeError> {
    let (n, _) = open_record(bytes)?;
    Ok(n.max(1))
}

/// How many readings a value that fails to decode says it holds, for
/// counting what a damaged record took with it. Unverified (the damage may be
/// in the count itself), so at least 1 and at most [`MAX_RECORD_READINGS`].
pub fn claimed_len(bytes: &[u8]) -> u64 {
    let mut r = Reader { bytes, pos: 5 };
    match bytes.first() {
        Some(&FORMAT_VERSION) => r
            .varint("reading count")
            .map_or(1, |n| n.clamp(1, MAX_RECORD_READINGS as u64)),
        _ => 1,
    }
}

/// Checks the version and checksum; returns the reading count (0 for the
/// legacy one-reading layout) and a reader positioned after it.
fn open_record(bytes: &[u8]) -> Result<(u64, Reader<'_>), DecodeError> {
    let mut r = Reader { bytes, pos: 0 };
    match r.u8("version").map_err(|_| DecodeError::Empty)? {
        LEGACY_VERSION => Ok((0, r)),
        FORMAT_VERSION => {
            let stored = u32::from_le_bytes(r.array::<4>("checksum")?);
            let computed = crc32fast::hash(&bytes[r.pos..]);
            if stored != computed {
                return Err(DecodeError::Checksum { stored, computed });
            }
            let n = r.varint("reading count")?;
            if n == 0 {
                return Err(DecodeError::EmptyRecord);
            }
            Ok((n, r))
        }
        other => Err(DecodeError::UnknownVersion(other)),
    }
}

/// Numbers that are whole (most counters and register values) are stored as
/// varints: `field1=123456` takes 3 bytes instead of 8.
fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Number(n) if is_small_whole(*n) => {
            out.push(VALUE_INTEGER);
            put_varint(out, zigzag(*n as i64));
        }
        Value::Number(n) => {
            out.push(VALUE_FLOAT);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Value::Text(s) => {
            out.push(VALUE_TEXT);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// Whole, exactly representable as an i64 and back, and not -0.0.
fn is_small_whole(n: f64) -> bool {
    const LIMIT: f64 = (1u64 << 53) as f64;
    n.fract() == 0.0 && n.abs() <= LIMIT && !(n == 0.0 && n.is_sign_negative())
}

const VALUE_FLOAT: u8 = 0;
const VALUE_TEXT: u8 = 1;
const VALUE_INTEGER: u8 = 2;

fn read_value(r: &mut Reader<'_>) -> Result<Value, DecodeError> {
    Ok(match r.u8("value kind")? {
        VALUE_FLOAT => Value::Number(f64::from_le_bytes(r.array::<8>("number")?)),
        VALUE_TEXT => Value::Text(r.string("text value")?),
        VALUE_INTEGER => Value::Number(unzigzag(r.varint("number")?) as f64),
        other => return Err(DecodeError::BadValueKind(other)),
    })
}

fn source_tag(source: SourceKind) -> u8 {
    match source {
        SourceKind::Mqtt => 0,
        SourceKind::Serial => 1,
        SourceKind::Modbus => 2,
    }
}

fn source_from_tag(tag: u8) -> Result<SourceKind, DecodeError> {
    match tag {
        0 => Ok(SourceKind::Mqtt),
        1 => Ok(SourceKind::Serial),
        2 => Ok(SourceKind::Modbus),
        other => Err(DecodeError::BadSource(other)),
    }
}

/// A version-1 reading body (see the module docs).
fn read_legacy_reading(r: &mut Reader<'_>, channel: ChannelId) -> Result<Reading, DecodeError> {
    let target = target_from_tag(r.u8("target")?)?;
    let measured_at = read_measured_at(r)?;
    let value = match r.u8("value kind")? {
        VALUE_FLOAT => Value::Number(f64::from_le_bytes(r.array::<8>("number")?)),
        VALUE_TEXT => Value::Text(r.string("text value")?),
        other => return Err(DecodeError::BadValueKind(other)),
    };
    let source = source_from_tag(r.u8("source")?)?;
    let device = r.string("device name")?;
    Ok(Reading {
        channel,
        target,
        value,
        measured_at,
        origin: Origin { source, device },
    })
}

fn read_measured_at(r: &mut Reader<'_>) -> Result<DateTime<Utc>, DecodeError> {
    let secs = unzigzag(r.varint("timestamp")?);
    let nanos = u32::try_from(r.varint("timestamp")?).map_err(|_| DecodeError::BadTimestamp)?;
    DateTime::<Utc>::from_timestamp(secs, nanos).ok_or(DecodeError::BadTimestamp)
}

/// The `measured_at` of a record's first reading (`oldest()` reads only this).
pub fn decode_measured_at(bytes: &[u8]) -> Result<DateTime<Utc>, DecodeError> {
    let (n, mut r) = open_record(bytes)?;
    if n == 0 {
        target_from_tag(r.u8("target")?)?;
        return read_measured_at(&mut r);
    }
    read_devices(&mut r)?;
    r.varint("offset")?;
    target_from_tag(r.u8("target")?)?;
    r.varint("device index")?;
    read_measured_at(&mut r)
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
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Nothing may follow the last field: a damaged length shows up here.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.bytes.len() - self.pos {
            0 => Ok(()),
            rest => Err(DecodeError::TrailingBytes(rest)),
        }
    }

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

    /// The first release's one-reading value (format version 1).
    fn encode_legacy(r: &Reading) -> Vec<u8> {
        let mut out = vec![LEGACY_VERSION, target_tag(r.target)];
        put_varint(&mut out, zigzag(r.measured_at.timestamp()));
        put_varint(&mut out, u64::from(r.measured_at.timestamp_subsec_nanos()));
        match &r.value {
            Value::Number(n) => {
                out.push(VALUE_FLOAT);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Value::Text(t) => {
                out.push(VALUE_TEXT);
                put_bytes(&mut out, t.as_bytes());
            }
        }
        out.push(source_tag(r.origin.source));
        put_bytes(&mut out, r.origin.device.as_bytes());
        out
    }

    fn key(seq: u64) -> QueueKey {
        QueueKey {
            channel: ChannelId::new(1_234_567).unwrap(),
            seq,
        }
    }

    #[test]
    fn numeric_reading_is_compact() {
        let r = reading(Value::Number(21.5), "esp-kitchen");
        assert_eq!(
            encode_legacy(&r).len(),
            33,
            "documented legacy size changed"
        );
        let one = encode_record(5, std::iter::once((5, &r)));
        assert_eq!(
            decode_record(key(5), &one).unwrap(),
            vec![(key(5), r.clone())]
        );
        // Many share the key, the header (20 bytes with this device's entry,
        // 4 more for the first timestamp) and the device: 17 bytes a reading
        // with a fractional value, 11 with a whole one (documented).
        let many: Vec<(u64, &Reading)> = (0..100).map(|i| (100 + i, &r)).collect();
        let bytes = encode_record(100, many.into_iter());
        assert_eq!(bytes.len(), 20 + 4 + 100 * 17, "documented size changed");
        assert_eq!(record_len(&bytes).unwrap(), 100);
        let whole = reading(Value::Number(123.0), "esp-kitchen");
        let many: Vec<(u64, &Reading)> = (0..100).map(|i| (100 + i, &whole)).collect();
        let bytes = encode_record(100, many.into_iter());
        assert_eq!(bytes.len(), 20 + 4 + 100 * 11, "documented size changed");
        let json = serde_json_len(&r);
        assert!(json > 7 * 17, "json {json}");
    }

    #[test]
    fn legacy_values_read_as_one_reading_records() {
        let r = reading(Value::Number(1.0), "old");
        let bytes = encode_legacy(&r);
        assert_eq!(
            decode_record(key(77), &bytes).unwrap(),
            vec![(key(77), r.clone())]
        );
        assert_eq!(record_len(&bytes).unwrap(), 1);
        assert_eq!(decode_measured_at(&bytes).unwrap(), r.measured_at);
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
        let a = reading(Value::Text("on".into()), "d");
        let b = reading(Value::Number(2.0), "e");
        let good = encode_record(10, [(10, &a), (12, &b)].into_iter());
        // A record that lost its first reading keeps its key.
        let rest = encode_record(10, [(12, &b)].into_iter());
        assert_eq!(
            decode_record(key(10), &rest).unwrap(),
            vec![(key(12), b.clone())]
        );
        assert_eq!(decode_record(key(10), &good).unwrap().len(), 2);
        assert_eq!(decode_record(key(1), &[]), Err(DecodeError::Empty));
        assert_eq!(
            decode_record(key(1), &[9]),
            Err(DecodeError::UnknownVersion(9))
        );
        assert_eq!(
            decode_record(key(1), &[LEGACY_VERSION, 13]),
            Err(DecodeError::BadTarget(13))
        );
        for cut in 1..good.len() {
            assert!(
                decode_record(key(10), &good[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        // Every single flipped bit after the version is caught by the checksum.
        for byte in 1..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    matches!(
                        decode_record(key(10), &bad),
                        Err(DecodeError::Checksum { .. })
                    ),
                    "byte {byte} bit {bit}"
                );
                assert!(record_len(&bad).is_err());
            }
        }
        let mut trailing = encode_legacy(&a);
        trailing.push(0);
        assert_eq!(
            decode_record(key(1), &trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        let endless_varint = [
            1u8, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(decode_record(key(1), &endless_varint).is_err());
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
        fn every_record_round_trips(
            readings in proptest::collection::vec(arb_reading(), 1..20),
            gaps in proptest::collection::vec(1u64..1000, 20),
            first in 0u64..u64::MAX / 2,
        ) {
            let channel = readings[0].channel;
            let readings: Vec<Reading> = readings
                .into_iter()
                .map(|r| Reading { channel, ..r })
                .collect();
            let mut seq = first;
            let entries: Vec<(u64, &Reading)> = readings
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    if i > 0 {
                        seq += gaps[i];
                    }
                    (seq, r)
                })
                .collect();
            let bytes = encode_record(first, entries.clone().into_iter());
            let k = QueueKey { channel, seq: first };
            let decoded = decode_record(k, &bytes).unwrap();
            let expected: Vec<(QueueKey, Reading)> = entries
                .iter()
                .map(|(s, r)| (QueueKey { channel, seq: *s }, (*r).clone()))
                .collect();
            prop_assert_eq!(decoded, expected);
            prop_assert_eq!(record_len(&bytes).unwrap(), readings.len() as u64);
            prop_assert_eq!(decode_measured_at(&bytes).unwrap(), readings[0].measured_at);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_record(key(u64::MAX - 3), &bytes);
            let _ = record_len(&bytes);
            let _ = decode_measured_at(&bytes);
        }
    }
}
