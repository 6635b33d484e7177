//! `key=value` pairs, as small devices print them: `t=21.5,h=40`.

use super::{parse_timestamp, Destination, ExtractError, Extracted, Extraction, FormatError};
use crate::reading::Value;

#[derive(Debug, Clone)]
pub struct KeyValue {
    fields: Vec<(String, Destination)>,
    pair_separator: String,
    kv_separator: String,
    time_key: Option<String>,
}

impl KeyValue {
    pub(super) fn new(
        fields: Vec<(String, Destination)>,
        pair_separator: String,
        kv_separator: String,
        time_key: Option<String>,
    ) -> Result<Self, FormatError> {
        if pair_separator.is_empty() || kv_separator.is_empty() {
            return Err(FormatError::EmptySeparator);
        }
        Ok(Self {
            fields,
            pair_separator,
            kv_separator,
            time_key,
        })
    }

    pub(super) fn extract(&self, text: &str) -> Extraction {
        let mut out = Extraction::default();
        let mut pairs = Vec::new();
        for pair in text.split(self.pair_separator.as_str()) {
            let pair = pair.trim();
            if pair.is_empty() {
                continue;
            }
            match pair.split_once(self.kv_separator.as_str()) {
                Some((k, v)) => pairs.push((k.trim(), v.trim())),
                None => out.errors.push(ExtractError::BadPair {
                    pair: truncate(pair),
                    separator: self.kv_separator.clone(),
                }),
            }
        }
        let measured_at = self.time_key.as_deref().and_then(|key| {
            let (_, v) = pairs.iter().find(|(k, _)| *k == key)?;
            match parse_timestamp(v) {
                Ok(t) => Some(t),
                Err(e) => {
                    out.errors.push(e);
                    None
                }
            }
        });
        for (key, value) in pairs {
            // Unmapped keys are ignored: devices often print more than is wanted.
            for (_, destination) in self.fields.iter().filter(|(k, _)| k == key) {
                match destination.apply(Value::from_text(value)) {
                    Ok(value) => out.values.push(Extracted {
                        channel: destination.channel,
                        target: destination.target,
                        value,
                        measured_at,
                    }),
                    Err(e) => out.errors.push(e),
                }
            }
        }
        out
    }
}

/// Error messages quote at most this much of a device's text.
fn truncate(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(keys: &[(&str, &str)], pair: &str, sep: &str) -> KeyValue {
        let fields = crate::extract::test_mapping(keys, 1.0);
        KeyValue::new(fields, pair.into(), sep.into(), Some("ts".into())).unwrap()
    }

    #[test]
    fn arduino_line() {
        let out = kv(&[("t", "field1"), ("h", "field2")], ",", "=").extract("t=21.5,h=40\r");
        assert_eq!(out.errors, vec![]);
        assert_eq!(out.values[0].value, Value::Number(21.5));
        assert_eq!(out.values[1].value, Value::Number(40.0));
    }

    #[test]
    fn bad_pairs_do_not_spoil_good_ones() {
        let out = kv(&[("t", "field1"), ("h", "field2")], ";", ":").extract("t:1;garbage;h:2;x:9");
        assert_eq!(out.values.len(), 2);
        assert_eq!(out.errors.len(), 1);
    }

    #[test]
    fn time_key_sets_measured_at() {
        let out = kv(&[("t", "field1")], ",", "=").extract("t=1,ts=1767323045");
        assert_eq!(
            out.values[0].measured_at.unwrap().timestamp(),
            1_767_323_045
        );
    }

    #[test]
    fn long_garbage_is_quoted_truncated() {
        let out = kv(&[("t", "field1")], ",", "=").extract(&"é".repeat(1000));
        match &out.errors[0] {
            ExtractError::BadPair { pair, .. } => assert!(pair.len() < 80),
            other => panic!("unexpected {other:?}"),
        }
    }
}
