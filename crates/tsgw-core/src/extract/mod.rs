//! Turning a device's payload (an MQTT message, a serial line) into values.
//!
//! A [`PayloadFormat`] is what the user writes in the config; [`Extractor::compile`]
//! checks it once (regexes, JSON pointers, targets) so that extracting per message
//! cannot fail for config reasons. Extraction is partial by design: one bad
//! value in a message is reported in [`Extraction::errors`] and the good values
//! of the same message are still used.

mod csv;
mod json;
mod key_value;
mod plain;
mod regex;
mod time;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thingspeak::{ChannelId, Target};

use crate::reading::Value;

pub use time::parse_timestamp;

/// Where an extracted value goes, as written in the config: either just the
/// target (`"field1"`) or a table with optional channel override, scale and offset.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum DestinationSpec {
    Target(Target),
    Detailed {
        target: Target,
        #[serde(default)]
        channel: Option<ChannelId>,
        #[serde(default)]
        scale: Option<f64>,
        #[serde(default)]
        offset: Option<f64>,
    },
}

/// A payload format and the mapping of its parts to channel targets, as configured.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum PayloadFormat {
    /// The whole payload is one value (number or text).
    Plain { target: DestinationSpec },
    /// A JSON document; each JSON pointer (`/sensor/temp`) feeds one target.
    Json {
        fields: BTreeMap<String, DestinationSpec>,
        /// Pointer to the measurement time (RFC 3339 text, or Unix seconds/milliseconds).
        #[serde(default)]
        time_pointer: Option<String>,
    },
    /// `key=value` pairs such as `t=21.5,h=40`.
    KeyValue {
        fields: BTreeMap<String, DestinationSpec>,
        #[serde(default = "default_pair_separator")]
        pair_separator: String,
        #[serde(default = "default_kv_separator")]
        kv_separator: String,
        /// Key whose value is the measurement time.
        #[serde(default)]
        time_key: Option<String>,
    },
    /// Header-less delimited columns such as `21.5,40`; keys are column numbers, 0 first.
    Csv {
        columns: BTreeMap<String, DestinationSpec>,
        #[serde(default = "default_pair_separator")]
        separator: String,
        /// Column holding the measurement time.
        #[serde(default)]
        time_column: Option<usize>,
    },
    /// A regular expression; each named group (`(?P<temp>...)`) feeds one target.
    Regex {
        pattern: String,
        fields: BTreeMap<String, DestinationSpec>,
        /// Named group holding the measurement time.
        #[serde(default)]
        time_group: Option<String>,
    },
}

fn default_pair_separator() -> String {
    ",".into()
}

fn default_kv_separator() -> String {
    "=".into()
}

/// A resolved destination: channel, target, and a linear transform for numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub channel: ChannelId,
    pub target: Target,
    pub scale: f64,
    pub offset: f64,
}

impl Destination {
    fn resolve(spec: &DestinationSpec, default_channel: ChannelId) -> Destination {
        match spec {
            DestinationSpec::Target(target) => Destination {
                channel: default_channel,
                target: *target,
                scale: 1.0,
                offset: 0.0,
            },
            DestinationSpec::Detailed {
                target,
                channel,
                scale,
                offset,
            } => Destination {
                channel: channel.unwrap_or(default_channel),
                target: *target,
                scale: scale.unwrap_or(1.0),
                offset: offset.unwrap_or(0.0),
            },
        }
    }

    /// Applies scale and offset to numbers; text passes through unchanged.
    pub fn apply(&self, value: Value) -> Result<Value, ExtractError> {
        match value {
            Value::Number(n) => {
                let scaled = n * self.scale + self.offset;
                if scaled.is_finite() {
                    Ok(Value::Number(scaled))
                } else {
                    Err(ExtractError::NotFinite {
                        target: self.target,
                    })
                }
            }
            text => Ok(text),
        }
    }
}

/// One value pulled out of a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Extracted {
    pub channel: ChannelId,
    pub target: Target,
    pub value: Value,
    /// The time the payload carried, if the format has one configured and it was present.
    pub measured_at: Option<DateTime<Utc>>,
}

/// What went wrong with one part of a payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("payload is not valid JSON: {0}")]
    BadJson(String),
    #[error("JSON pointer {pointer:?} is missing from the payload")]
    MissingPointer { pointer: String },
    #[error("JSON pointer {pointer:?} holds an object or array, not a value")]
    NotAScalar { pointer: String },
    #[error("pair {pair:?} has no {separator:?} separator")]
    BadPair { pair: String, separator: String },
    #[error("value for {target} is not a finite number after scaling")]
    NotFinite { target: Target },
    #[error("time {0:?} is neither RFC 3339 nor Unix seconds/milliseconds")]
    BadTime(String),
    #[error("payload is empty")]
    Empty,
    #[error("payload matched no configured key")]
    NothingMatched,
    #[error("payload does not match the configured pattern")]
    NoMatch,
    #[error("named group {group:?} did not take part in the match")]
    MissingGroup { group: String },
    #[error("column {column} is missing (the line has {columns} columns)")]
    MissingColumn { column: usize, columns: usize },
    #[error("{0}")]
    Other(String),
}

impl ExtractError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ExtractError::NotUtf8 => "not_utf8",
            ExtractError::BadJson(_) => "bad_json",
            ExtractError::MissingPointer { .. } => "missing_pointer",
            ExtractError::NotAScalar { .. } => "not_scalar",
            ExtractError::BadPair { .. } => "bad_pair",
            ExtractError::NotFinite { .. } => "not_finite",
            ExtractError::BadTime(_) => "bad_time",
            ExtractError::Empty => "empty",
            ExtractError::NothingMatched => "nothing_matched",
            ExtractError::NoMatch => "no_match",
            ExtractError::MissingGroup { .. } => "missing_group",
            ExtractError::MissingColumn { .. } => "missing_column",
            ExtractError::Other(_) => "other",
        }
    }
}

/// An invalid format in the config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FormatError {
    #[error("JSON pointer {0:?} must be empty or start with '/'")]
    BadPointer(String),
    #[error("separator must not be empty")]
    EmptySeparator,
    #[error("no fields are mapped")]
    NoFields,
    #[error("{0}")]
    Invalid(String),
}

/// The values of one payload and the errors of the parts that failed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Extraction {
    pub values: Vec<Extracted>,
    pub errors: Vec<ExtractError>,
}

/// A checked, ready-to-run payload format.
#[derive(Debug, Clone)]
pub enum Extractor {
    Plain(plain::Plain),
    Json(json::Json),
    KeyValue(key_value::KeyValue),
    Csv(csv::Csv),
    Regex(regex::Regex),
}

impl Extractor {
    /// Checks a configured format. `default_channel` is used by destinations
    /// that do not name their own channel.
    pub fn compile(
        format: &PayloadFormat,
        default_channel: ChannelId,
    ) -> Result<Self, FormatError> {
        let resolve_all = |fields: &BTreeMap<String, DestinationSpec>| {
            if fields.is_empty() {
                return Err(FormatError::NoFields);
            }
            Ok(fields
                .iter()
                .map(|(k, spec)| (k.clone(), Destination::resolve(spec, default_channel)))
                .collect::<Vec<_>>())
        };
        Ok(match format {
            PayloadFormat::Plain { target } => Extractor::Plain(plain::Plain {
                destination: Destination::resolve(target, default_channel),
            }),
            PayloadFormat::Json {
                fields,
                time_pointer,
            } => Extractor::Json(json::Json::new(resolve_all(fields)?, time_pointer.clone())?),
            PayloadFormat::KeyValue {
                fields,
                pair_separator,
                kv_separator,
                time_key,
            } => Extractor::KeyValue(key_value::KeyValue::new(
                resolve_all(fields)?,
                pair_separator.clone(),
                kv_separator.clone(),
                time_key.clone(),
            )?),
            PayloadFormat::Csv {
                columns,
                separator,
                time_column,
            } => Extractor::Csv(csv::Csv::new(
                resolve_all(columns)?,
                separator.clone(),
                *time_column,
            )?),
            PayloadFormat::Regex {
                pattern,
                fields,
                time_group,
            } => Extractor::Regex(regex::Regex::new(
                pattern,
                resolve_all(fields)?,
                time_group.clone(),
            )?),
        })
    }

    /// Extracts what it can from raw payload bytes.
    pub fn extract(&self, payload: &[u8]) -> Extraction {
        let Ok(text) = std::str::from_utf8(payload) else {
            return Extraction {
                values: Vec::new(),
                errors: vec![ExtractError::NotUtf8],
            };
        };
        self.extract_str(text)
    }

    /// Extracts what it can from a text payload.
    pub fn extract_str(&self, text: &str) -> Extraction {
        let mut out = match self {
            Extractor::Plain(p) => p.extract(text),
            Extractor::Json(j) => j.extract(text),
            Extractor::KeyValue(kv) => kv.extract(text),
            Extractor::Csv(c) => c.extract(text),
            Extractor::Regex(r) => r.extract(text),
        };
        if out.values.is_empty() && out.errors.is_empty() {
            out.errors.push(ExtractError::NothingMatched);
        }
        out
    }
}

/// Test helper: `(key, "fieldN")` pairs mapped to channel 1 with `scale` and no offset.
#[cfg(test)]
pub(crate) fn test_mapping(pairs: &[(&str, &str)], scale: f64) -> Vec<(String, Destination)> {
    pairs
        .iter()
        .map(|(key, target)| {
            (
                key.to_string(),
                Destination {
                    channel: ChannelId::new(1).expect("1 is a channel id"),
                    target: target.parse().expect("test target"),
                    scale,
                    offset: 0.0,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> ChannelId {
        ChannelId::new(100).unwrap()
    }

    #[test]
    fn formats_deserialize_from_toml_shaped_json() {
        let f: PayloadFormat = serde_json::from_value(serde_json::json!({
            "format": "json",
            "fields": {"/t": "field1", "/h": {"target": "field2", "scale": 0.1, "channel": 7}},
            "time_pointer": "/ts",
        }))
        .unwrap();
        let ex = Extractor::compile(&f, channel()).unwrap();
        let out = ex.extract(br#"{"t": 21.5, "h": 400, "ts": "2026-01-02T03:04:05Z"}"#);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.values.len(), 2);
        let h = out
            .values
            .iter()
            .find(|v| v.target.to_string() == "field2")
            .unwrap();
        assert_eq!(h.channel.get(), 7);
        assert_eq!(h.value, Value::Number(40.0));
        assert_eq!(
            h.measured_at.unwrap().to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
    }

    #[test]
    fn unknown_format_keys_are_rejected() {
        let r: Result<PayloadFormat, _> = serde_json::from_value(serde_json::json!({
            "format": "plain", "target": "field1", "targte": "x"
        }));
        assert!(r.is_err());
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_panic() {
        let f = PayloadFormat::Plain {
            target: DestinationSpec::Target("field1".parse().unwrap()),
        };
        let out = Extractor::compile(&f, channel())
            .unwrap()
            .extract(&[0xff, 0xfe]);
        assert_eq!(out.errors, vec![ExtractError::NotUtf8]);
    }
}
