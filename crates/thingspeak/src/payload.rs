//! MQTT payloads: the channel-feed update (`field1=..&status=..`), the
//! single-field payload (a bare value), and the JSON entry subscribers receive.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use percent_encoding::percent_decode;
use serde::{Deserialize, Serialize};

use crate::ids::{ChannelId, Field, Target};
use crate::limits::{self, ValueTooLong, MAX_MESSAGE_BYTES};
use crate::time::{self, format_timestamp, parse_timestamp, BadTimestamp};

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is {0} bytes, at most {MAX_MESSAGE_BYTES} are allowed")]
    TooLarge(usize),
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("parameter {0:?} is not valid UTF-8 after URL decoding")]
    BadEncoding(String),
    #[error("unknown parameter {0:?} (allowed: field1..field8, status, lat, long, elevation, created_at)")]
    UnknownParameter(String),
    #[error("parameter {0:?} appears more than once")]
    Duplicate(String),
    #[error(transparent)]
    BadCreatedAt(#[from] BadTimestamp),
    #[error(transparent)]
    ValueTooLong(#[from] ValueTooLong),
    #[error("payload has no field, status or location value")]
    NoValues,
}

/// One update of a channel's feed: values by target, and optionally the time
/// it was measured. `created_at` is sent at seconds resolution.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelUpdate {
    pub values: BTreeMap<Target, String>,
    pub created_at: Option<DateTime<Utc>>,
}

impl ChannelUpdate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&mut self, target: Target, value: impl Into<String>) -> &mut Self {
        self.values.insert(target, value.into());
        self
    }

    pub fn get(&self, target: Target) -> Option<&str> {
        self.values.get(&target).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The URL-encoded payload, parameters in a fixed order (fields, status,
    /// lat, long, elevation, created_at).
    pub fn encode(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (target, value) in &self.values {
            out.append_pair(target.param_name(), value);
        }
        if let Some(t) = &self.created_at {
            out.append_pair("created_at", &format_timestamp(t));
        }
        out.finish()
    }

    /// Checks what `parse` would check on the encoded form: at least one
    /// value, every value within 255 bytes, the whole within 3000 bytes.
    pub fn validate(&self) -> Result<(), PayloadError> {
        if self.values.is_empty() {
            return Err(PayloadError::NoValues);
        }
        for (target, value) in &self.values {
            limits::check_value(target.param_name(), value)?;
        }
        let len = self.encode().len();
        if len > MAX_MESSAGE_BYTES {
            return Err(PayloadError::TooLarge(len));
        }
        Ok(())
    }

    /// Parses a channel-feed payload. Unknown or repeated parameters, a bad
    /// `created_at`, an overlong value or message, or no values are errors.
    pub fn parse(payload: &[u8]) -> Result<ChannelUpdate, PayloadError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(PayloadError::TooLarge(payload.len()));
        }
        let pairs = parse_pairs(payload)?;
        Self::from_pairs(pairs)
    }

    /// Builds an update from decoded `name=value` pairs (shared with the REST
    /// form parser, which takes its own parameters out first).
    pub(crate) fn from_pairs(pairs: Vec<(String, String)>) -> Result<ChannelUpdate, PayloadError> {
        let mut update = ChannelUpdate::new();
        let mut seen_created_at = false;
        for (name, value) in pairs {
            if name == "created_at" {
                if seen_created_at {
                    return Err(PayloadError::Duplicate(name));
                }
                seen_created_at = true;
                update.created_at = Some(parse_timestamp(&value)?);
                continue;
            }
            if !limits::is_allowed_name(&name) {
                return Err(PayloadError::UnknownParameter(time::truncate(&name)));
            }
            let target: Target = name
                .parse()
                .map_err(|_| PayloadError::UnknownParameter(time::truncate(&name)))?;
            limits::check_value(&name, &value)?;
            if update.values.insert(target, value).is_some() {
                return Err(PayloadError::Duplicate(name));
            }
        }
        if update.values.is_empty() {
            return Err(PayloadError::NoValues);
        }
        Ok(update)
    }
}

/// Splits `a=1&b=2` into decoded pairs: `+` is a space, `%XX` a byte, and the
/// decoded bytes must be UTF-8. Empty pieces (`a=1&&b=2`, a trailing `&`) are skipped.
pub(crate) fn parse_pairs(payload: &[u8]) -> Result<Vec<(String, String)>, PayloadError> {
    let text = std::str::from_utf8(payload).map_err(|_| PayloadError::NotUtf8)?;
    let mut pairs = Vec::new();
    for piece in text.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = decode_component(raw_name)
            .ok_or_else(|| PayloadError::BadEncoding(time::truncate(raw_name)))?;
        let value =
            decode_component(raw_value).ok_or_else(|| PayloadError::BadEncoding(name.clone()))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

fn decode_component(s: &str) -> Option<String> {
    let spaced = s.replace('+', " ");
    percent_decode(spaced.as_bytes())
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Parses a single-field payload (the bare value): UTF-8 and at most 255 bytes.
pub fn parse_field_value(field: Field, payload: &[u8]) -> Result<String, PayloadError> {
    let value = std::str::from_utf8(payload).map_err(|_| PayloadError::NotUtf8)?;
    limits::check_value(Target::Field(field).param_name(), value)?;
    Ok(value.to_owned())
}

/// The JSON a subscriber receives for each new entry. Absent values are `null`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryJson {
    pub channel_id: ChannelId,
    #[serde(with = "time::serde_timestamp")]
    pub created_at: DateTime<Utc>,
    pub entry_id: u64,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field1: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field2: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field3: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field4: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field5: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field6: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field7: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field8: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub latitude: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub longitude: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub elevation: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub status: Option<String>,
}

impl EntryJson {
    /// An entry with no values.
    pub fn new(channel_id: ChannelId, entry_id: u64, created_at: DateTime<Utc>) -> Self {
        Self {
            channel_id,
            created_at,
            entry_id,
            field1: None,
            field2: None,
            field3: None,
            field4: None,
            field5: None,
            field6: None,
            field7: None,
            field8: None,
            latitude: None,
            longitude: None,
            elevation: None,
            status: None,
        }
    }

    /// The entry a channel update becomes (its `created_at`, or `now`).
    pub fn from_update(
        channel_id: ChannelId,
        entry_id: u64,
        now: DateTime<Utc>,
        update: &ChannelUpdate,
    ) -> Self {
        let mut entry = Self::new(channel_id, entry_id, update.created_at.unwrap_or(now));
        for (target, value) in &update.values {
            *entry.slot_mut(*target) = Some(value.clone());
        }
        entry
    }

    /// The entry's values as an update (with its `created_at`).
    pub fn to_update(&self) -> ChannelUpdate {
        let mut update = ChannelUpdate {
            values: BTreeMap::new(),
            created_at: Some(self.created_at),
        };
        for target in all_targets() {
            if let Some(v) = self.get(target) {
                update.values.insert(target, v.to_owned());
            }
        }
        update
    }
}

crate::slots::impl_target_slots!(EntryJson);

/// Every target, fields first.
pub fn all_targets() -> impl Iterator<Item = Target> {
    Field::all().map(Target::Field).chain([
        Target::Status,
        Target::Latitude,
        Target::Longitude,
        Target::Elevation,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn f(n: u8) -> Target {
        Target::Field(Field::new(n).unwrap())
    }

    #[test]
    fn encodes_in_fixed_order_with_escaping() {
        let mut u = ChannelUpdate::new();
        u.set(Target::Status, "all ok & fine")
            .set(f(2), "40")
            .set(f(1), "21.5");
        u.created_at = Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        assert_eq!(
            u.encode(),
            "field1=21.5&field2=40&status=all+ok+%26+fine&created_at=2026-01-02T03%3A04%3A05Z"
        );
        assert_eq!(ChannelUpdate::parse(u.encode().as_bytes()).unwrap(), u);
    }

    #[test]
    fn parses_the_documented_example() {
        let u = ChannelUpdate::parse(b"field1=21.5&field2=40&status=MQTTPUBLISH").unwrap();
        assert_eq!(u.get(f(1)), Some("21.5"));
        assert_eq!(u.get(f(2)), Some("40"));
        assert_eq!(u.get(Target::Status), Some("MQTTPUBLISH"));
        assert_eq!(u.created_at, None);
        let u = ChannelUpdate::parse(b"lat=1.5&long=-2&elevation=100&").unwrap();
        assert_eq!(u.get(Target::Longitude), Some("-2"));
    }

    #[test]
    fn rejects_bad_payloads() {
        use PayloadError::*;
        let cases: [(&[u8], PayloadError); 7] = [
            (b"field9=1", UnknownParameter("field9".into())),
            (b"field1=1&field1=2", Duplicate("field1".into())),
            (
                b"field1=1&created_at=2026-01-01T00:00:00Z&created_at=2026-01-01T00:00:00Z",
                Duplicate("created_at".into()),
            ),
            (
                b"field1=1&created_at=soon",
                BadCreatedAt(BadTimestamp("soon".into())),
            ),
            (b"", NoValues),
            (b"\xff", NotUtf8),
            (b"field1=%ff", BadEncoding("field1".into())),
        ];
        for (payload, want) in cases {
            assert_eq!(ChannelUpdate::parse(payload), Err(want), "{payload:?}");
        }
        let long = format!("field1={}", "x".repeat(256));
        assert!(matches!(
            ChannelUpdate::parse(long.as_bytes()),
            Err(ValueTooLong(_))
        ));
        let huge = "field1=1&".repeat(400);
        assert_eq!(ChannelUpdate::parse(huge.as_bytes()), Err(TooLarge(3600)));
    }

    #[test]
    fn field_payload_is_the_bare_value() {
        assert_eq!(
            parse_field_value(Field::new(1).unwrap(), b"21.5").unwrap(),
            "21.5"
        );
        assert!(parse_field_value(Field::new(1).unwrap(), &[b'1'; 256]).is_err());
        assert!(parse_field_value(Field::new(1).unwrap(), b"\xc3").is_err());
    }

    #[test]
    fn entry_json_has_nulls_for_absent_values() {
        let ch = ChannelId::new(7).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let mut u = ChannelUpdate::new();
        u.set(f(1), "21.5");
        let e = EntryJson::from_update(ch, 3, t, &u);
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["channel_id"], 7);
        assert_eq!(v["created_at"], "2026-01-02T03:04:05Z");
        assert_eq!(v["entry_id"], 3);
        assert_eq!(v["field1"], "21.5");
        assert!(v["field2"].is_null());
        assert!(v["status"].is_null());
        assert!(v["latitude"].is_null());
        // Clients sometimes see numbers where ThingSpeak sends strings.
        let parsed: EntryJson = serde_json::from_str(
            r#"{"channel_id":7,"created_at":"2026-01-02T03:04:05Z","entry_id":3,"field1":21.5}"#,
        )
        .unwrap();
        assert_eq!(parsed, e);
        assert_eq!(parsed.to_update().get(f(1)), Some("21.5"));
    }
}
