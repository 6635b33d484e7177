//! ThingSpeak's timestamp format: ISO 8601 in UTC at seconds resolution,
//! `2026-01-02T03:04:05Z`.

use chrono::{DateTime, Datelike, NaiveDateTime, SecondsFormat, Utc};

/// Formats `t` the way ThingSpeak writes `created_at` (sub-seconds are dropped).
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A `created_at` that is not a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("created_at {0:?} is not an ISO 8601 timestamp like 2026-01-02T03:04:05Z")]
pub struct BadTimestamp(pub String);

/// Parses RFC 3339 / ISO 8601 with any offset, or `YYYY-MM-DD HH:MM:SS` taken as UTC.
///
/// Years outside 0000..=9999 are refused: [`format_timestamp`] would write
/// them with a sign (`-8096-01-01T00:00:00Z`), which is not a timestamp
/// ThingSpeak (or this parser) reads back (found by the `thingspeak_payload`
/// fuzz target).
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, BadTimestamp> {
    let parsed = match DateTime::parse_from_rfc3339(s) {
        Ok(t) => Ok(t.with_timezone(&Utc)),
        Err(_) => NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").map(|n| n.and_utc()),
    };
    match parsed {
        Ok(t) if (0..=9999).contains(&t.year()) => Ok(t),
        _ => Err(BadTimestamp(truncate(s))),
    }
}

/// Keeps error messages bounded when the input is hostile.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// serde adapter for `DateTime<Utc>` in ThingSpeak's format.
pub mod serde_timestamp {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_timestamp(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_timestamp(&s).map_err(serde::de::Error::custom)
    }
}

/// serde adapter for `Option<DateTime<Utc>>` in ThingSpeak's format.
pub mod serde_opt_timestamp {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format_timestamp(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse_timestamp(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// serde adapter for optional values ThingSpeak (and its clients) write as
/// either strings or JSON numbers; always stored as text.
pub mod serde_opt_text {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(i64),
            UInt(u64),
            Float(f64),
        }
        Ok(Option::<Raw>::deserialize(d)?.map(|r| match r {
            Raw::Text(s) => s,
            Raw::Int(n) => n.to_string(),
            Raw::UInt(n) => n.to_string(),
            Raw::Float(n) => n.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn formats_at_seconds_resolution() {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap()
            + chrono::Duration::milliseconds(789);
        assert_eq!(format_timestamp(&t), "2026-01-02T03:04:05Z");
    }

    #[test]
    fn parses_common_forms() {
        let want = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(parse_timestamp("2026-01-02T03:04:05Z").unwrap(), want);
        assert_eq!(parse_timestamp("2026-01-02T04:04:05+01:00").unwrap(), want);
        assert_eq!(parse_timestamp("2026-01-02 03:04:05").unwrap(), want);
        assert!(parse_timestamp("yesterday").is_err());
        assert!(parse_timestamp("").is_err());
    }

    #[test]
    fn what_parses_formats_back_to_itself() {
        assert!(parse_timestamp("-8096-01-01 00:00:00").is_err());
        assert!(parse_timestamp("+12000-01-01 00:00:00").is_err());
        assert!(parse_timestamp("12000-01-01 00:00:00").is_err());
        for s in ["0000-01-01 00:00:00", "9999-12-31 23:59:59"] {
            let t = parse_timestamp(s).unwrap();
            assert_eq!(parse_timestamp(&format_timestamp(&t)).unwrap(), t, "{s}");
        }
    }
}
