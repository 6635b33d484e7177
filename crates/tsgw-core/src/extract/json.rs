//! JSON documents: each configured JSON pointer feeds one destination.

use super::{parse_timestamp, Destination, ExtractError, Extracted, Extraction, FormatError};
use crate::reading::Value;

/// Deeper documents are refused before parsing: serde_json's own limit is 128,
/// and a device has no reason to send anything near it.
const MAX_DEPTH: usize = 32;

#[derive(Debug, Clone)]
pub struct Json {
    fields: Vec<(String, Destination)>,
    time_pointer: Option<String>,
}

fn check_pointer(p: &str) -> Result<(), FormatError> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(FormatError::BadPointer(p.to_owned()))
    }
}

impl Json {
    pub(super) fn new(
        fields: Vec<(String, Destination)>,
        time_pointer: Option<String>,
    ) -> Result<Self, FormatError> {
        for (p, _) in &fields {
            check_pointer(p)?;
        }
        if let Some(p) = &time_pointer {
            check_pointer(p)?;
        }
        Ok(Self {
            fields,
            time_pointer,
        })
    }

    pub(super) fn extract(&self, text: &str) -> Extraction {
        let mut out = Extraction::default();
        if nesting_depth(text) > MAX_DEPTH {
            out.errors.push(ExtractError::BadJson(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
            return out;
        }
        let doc: serde_json::Value = match serde_json::from_str(text) {
            Ok(doc) => doc,
            Err(e) => {
                out.errors.push(ExtractError::BadJson(e.to_string()));
                return out;
            }
        };
        let measured_at = match &self.time_pointer {
            None => None,
            Some(p) => match doc.pointer(p).and_then(scalar_text) {
                Some(t) => match parse_timestamp(&t) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        out.errors.push(e);
                        None
                    }
                },
                None => {
                    out.errors
                        .push(ExtractError::MissingPointer { pointer: p.clone() });
                    None
                }
            },
        };
        for (pointer, destination) in &self.fields {
            let value = match doc.pointer(pointer) {
                None => Err(ExtractError::MissingPointer {
                    pointer: pointer.clone(),
                }),
                Some(serde_json::Value::Number(n)) => match n.as_f64() {
                    Some(f) => destination.apply(Value::Number(f)),
                    None => Err(ExtractError::NotFinite {
                        target: destination.target,
                    }),
                },
                Some(serde_json::Value::Bool(b)) => {
                    destination.apply(Value::Number(if *b { 1.0 } else { 0.0 }))
                }
                Some(serde_json::Value::String(s)) => destination.apply(Value::from_text(s)),
                Some(serde_json::Value::Null) => Err(ExtractError::MissingPointer {
                    pointer: pointer.clone(),
                }),
                Some(_) => Err(ExtractError::NotAScalar {
                    pointer: pointer.clone(),
                }),
            };
            match value {
                Ok(value) => out.values.push(Extracted {
                    channel: destination.channel,
                    target: destination.target,
                    value,
                    measured_at,
                }),
                Err(e) => out.errors.push(e),
            }
        }
        out
    }
}

fn scalar_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Maximum bracket nesting, ignoring brackets inside strings. Linear and allocation-free.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingspeak::{ChannelId, Target};

    fn json(pointers: &[(&str, &str)]) -> Json {
        let fields = crate::extract::test_mapping(pointers, 1.0);
        Json::new(fields, None).unwrap()
    }

    #[test]
    fn one_message_feeds_several_fields_and_keeps_good_parts() {
        let j = json(&[
            ("/a", "field1"),
            ("/b/c", "field2"),
            ("/missing", "field3"),
            ("/obj", "field4"),
        ]);
        let out = j.extract(r#"{"a": 1.5, "b": {"c": "on"}, "obj": {"x": 1}}"#);
        assert_eq!(out.values.len(), 2);
        assert_eq!(out.values[0].value, Value::Number(1.5));
        assert_eq!(out.values[1].value, Value::Text("on".into()));
        assert_eq!(out.errors.len(), 2);
    }

    #[test]
    fn deep_documents_are_refused_without_recursion() {
        let deep = "[".repeat(100_000);
        let out = json(&[("/a", "field1")]).extract(&deep);
        assert!(matches!(out.errors[0], ExtractError::BadJson(_)));
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        assert_eq!(nesting_depth(r#"{"a": "[[[[\"[["}"#), 1);
    }

    #[test]
    fn pointers_must_start_with_slash() {
        let d = Destination {
            channel: ChannelId::new(1).unwrap(),
            target: Target::Status,
            scale: 1.0,
            offset: 0.0,
        };
        assert!(Json::new(vec![("temp".into(), d)], None).is_err());
    }
}
