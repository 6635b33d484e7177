//! One measured value on its way to a ThingSpeak channel.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thingspeak::{ChannelId, Target};

/// A single value for one target of one channel, with when and where it was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub channel: ChannelId,
    pub target: Target,
    pub value: Value,
    /// When the device measured it (or, if the device did not say, when the gateway received it).
    pub measured_at: DateTime<Utc>,
    pub origin: Origin,
}

/// A reading's value. Numbers stay numbers so that windows can aggregate them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Number(f64),
    Text(String),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Text(_) => None,
        }
    }

    /// Parses a device's textual value: a finite number if it looks like one, text otherwise.
    pub fn from_text(s: &str) -> Value {
        let trimmed = s.trim();
        match trimmed.parse::<f64>() {
            Ok(n) if n.is_finite() && looks_numeric(trimmed) => Value::Number(n),
            _ => Value::Text(s.to_owned()),
        }
    }
}

/// `f64::from_str` accepts "inf", "NaN" and "infinity"; devices that send those mean text.
fn looks_numeric(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
}

impl fmt::Display for Value {
    /// The text sent to ThingSpeak: numbers in their shortest form (`21.5`, `40`),
    /// rounded to 12 significant digits so that scaling artefacts such as
    /// `202 * 0.1 = 20.200000000000003` do not reach the channel.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(n) => write!(f, "{}", round_significant(*n)),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// Rounds to 12 significant digits by a round trip through scientific notation
/// (exact decimal rounding, no power-of-ten arithmetic on the float).
fn round_significant(n: f64) -> f64 {
    // Whole numbers below 10^12 have at most 12 digits: nothing to round, and
    // they are most readings (counters, registers); the round trip through
    // text is the expensive part.
    if n.fract() == 0.0 && n.abs() < 1e12 {
        return n;
    }
    format!("{n:.11e}").parse().unwrap_or(n)
}

/// The kind of source a reading came in through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Mqtt,
    Serial,
    Modbus,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mqtt => "mqtt",
            SourceKind::Serial => "serial",
            SourceKind::Modbus => "modbus",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a reading came from: the source kind and the device's configured name
/// (for MQTT, the client id of the publisher).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub source: SourceKind,
    pub device: String,
}

impl Origin {
    pub fn new(source: SourceKind, device: impl Into<String>) -> Self {
        Self {
            source,
            device: device.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_render_in_shortest_form() {
        assert_eq!(Value::Number(21.5).to_string(), "21.5");
        assert_eq!(Value::Number(40.0).to_string(), "40");
        assert_eq!(Value::Number(-0.125).to_string(), "-0.125");
        assert_eq!(Value::Number(202.0 * 0.1).to_string(), "20.2");
        assert_eq!(Value::Number(1e-7).to_string(), "0.0000001");
        assert_eq!(Value::Number(123456789012.0).to_string(), "123456789012");
    }

    #[test]
    fn text_that_is_not_a_finite_number_stays_text() {
        assert_eq!(Value::from_text(" 3.5 "), Value::Number(3.5));
        assert_eq!(Value::from_text("NaN"), Value::Text("NaN".into()));
        assert_eq!(Value::from_text("inf"), Value::Text("inf".into()));
        assert_eq!(Value::from_text("on"), Value::Text("on".into()));
    }

    #[test]
    fn readings_round_trip_through_json() {
        let r = Reading {
            channel: ChannelId::new(7).unwrap(),
            target: Target::Status,
            value: Value::Text("ok".into()),
            measured_at: Utc::now(),
            origin: Origin::new(SourceKind::Serial, "arduino"),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reading>(&json).unwrap(), r);
    }
}
