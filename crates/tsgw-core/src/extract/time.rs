//! Measurement times carried inside payloads.

use chrono::{DateTime, TimeZone, Utc};

use super::ExtractError;

/// Unix times above this are taken as milliseconds (it is 2286-11-20 in seconds).
const MILLIS_THRESHOLD: f64 = 1e10;

/// Parses RFC 3339 text, or a Unix time in seconds or milliseconds.
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, ExtractError> {
    let trimmed = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(trimmed) {
        return Ok(t.with_timezone(&Utc));
    }
    match trimmed.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => {
            from_unix_number(n).ok_or_else(|| ExtractError::BadTime(text.to_owned()))
        }
        _ => Err(ExtractError::BadTime(text.to_owned())),
    }
}

fn from_unix_number(n: f64) -> Option<DateTime<Utc>> {
    let millis = if n > MILLIS_THRESHOLD { n } else { n * 1000.0 };
    if millis > i64::MAX as f64 {
        return None;
    }
    Utc.timestamp_millis_opt(millis as i64).single()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfc3339_seconds_and_millis() {
        let expected = "2026-01-02T03:04:05+00:00";
        assert_eq!(
            parse_timestamp("2026-01-02T03:04:05Z")
                .unwrap()
                .to_rfc3339(),
            expected
        );
        assert_eq!(
            parse_timestamp("1767323045").unwrap().to_rfc3339(),
            expected
        );
        assert_eq!(
            parse_timestamp("1767323045000").unwrap().to_rfc3339(),
            expected
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["yesterday", "-5", "NaN", "1e400", ""] {
            assert!(parse_timestamp(bad).is_err(), "{bad:?} accepted");
        }
    }
}
