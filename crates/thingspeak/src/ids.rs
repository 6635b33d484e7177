//! Typed identifiers of ThingSpeak's data model: channels, fields and the
//! other per-entry targets (status and location).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Number of data fields a ThingSpeak channel has.
pub const FIELD_COUNT: u8 = 8;

/// Why an identifier could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("channel id {0:?} is not a positive integer")]
    BadChannel(String),
    #[error("field {0:?} is not a field number from 1 to 8")]
    BadField(String),
    #[error(
        "{0:?} is not a channel target (expected field1..field8, status, lat, long or elevation)"
    )]
    BadTarget(String),
}

/// A ThingSpeak channel id: a positive integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct ChannelId(u64);

impl ChannelId {
    pub fn new(id: u64) -> Result<Self, IdError> {
        if id == 0 {
            return Err(IdError::BadChannel(id.to_string()));
        }
        Ok(Self(id))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for ChannelId {
    type Error = IdError;
    fn try_from(id: u64) -> Result<Self, IdError> {
        Self::new(id)
    }
}

impl From<ChannelId> for u64 {
    fn from(id: ChannelId) -> u64 {
        id.0
    }
}

impl FromStr for ChannelId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        // Reject signs, spaces and leading '+', which u64::from_str would accept in part.
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::BadChannel(s.to_owned()));
        }
        let id = s
            .parse::<u64>()
            .map_err(|_| IdError::BadChannel(s.to_owned()))?;
        Self::new(id)
    }
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A field number, 1 to 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Field(u8);

impl Field {
    pub fn new(n: u8) -> Result<Self, IdError> {
        if (1..=FIELD_COUNT).contains(&n) {
            Ok(Self(n))
        } else {
            Err(IdError::BadField(n.to_string()))
        }
    }

    pub fn get(self) -> u8 {
        self.0
    }

    /// All eight fields, in order.
    pub fn all() -> impl Iterator<Item = Field> {
        (1..=FIELD_COUNT).map(Field)
    }
}

impl TryFrom<u8> for Field {
    type Error = IdError;
    fn try_from(n: u8) -> Result<Self, IdError> {
        Self::new(n)
    }
}

impl From<Field> for u8 {
    fn from(f: Field) -> u8 {
        f.0
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field{}", self.0)
    }
}

impl FromStr for Field {
    type Err = IdError;
    /// Parses `field3` (the name used in payloads and topics).
    fn from_str(s: &str) -> Result<Self, IdError> {
        let digits = s
            .strip_prefix("field")
            .ok_or_else(|| IdError::BadField(s.to_owned()))?;
        if digits.len() != 1 {
            return Err(IdError::BadField(s.to_owned()));
        }
        let n = digits
            .parse::<u8>()
            .map_err(|_| IdError::BadField(s.to_owned()))?;
        Self::new(n).map_err(|_| IdError::BadField(s.to_owned()))
    }
}

/// What one value of a channel entry is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    Field(Field),
    Status,
    Latitude,
    Longitude,
    Elevation,
}

impl Target {
    /// The parameter name ThingSpeak uses in a channel-feed payload.
    pub fn param_name(self) -> &'static str {
        const FIELDS: [&str; 8] = [
            "field1", "field2", "field3", "field4", "field5", "field6", "field7", "field8",
        ];
        match self {
            Target::Field(f) => FIELDS[usize::from(f.get() - 1)],
            Target::Status => "status",
            Target::Latitude => "lat",
            Target::Longitude => "long",
            Target::Elevation => "elevation",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.param_name())
    }
}

impl FromStr for Target {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s {
            "status" => Ok(Target::Status),
            "lat" | "latitude" => Ok(Target::Latitude),
            "long" | "longitude" => Ok(Target::Longitude),
            "elevation" => Ok(Target::Elevation),
            other => other
                .parse::<Field>()
                .map(Target::Field)
                .map_err(|_| IdError::BadTarget(other.to_owned())),
        }
    }
}

impl TryFrom<String> for Target {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<Target> for String {
    fn from(t: Target) -> String {
        t.param_name().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_ids_must_be_positive_decimal() {
        assert_eq!("42".parse::<ChannelId>().unwrap().get(), 42);
        for bad in ["0", "", "-1", "+1", " 1", "1x", "99999999999999999999999"] {
            assert!(bad.parse::<ChannelId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fields_are_one_to_eight() {
        assert_eq!("field8".parse::<Field>().unwrap().get(), 8);
        for bad in ["field0", "field9", "field", "field10", "Field1", "1"] {
            assert!(bad.parse::<Field>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn targets_round_trip_through_their_names() {
        let all = Field::all().map(Target::Field).chain([
            Target::Status,
            Target::Latitude,
            Target::Longitude,
            Target::Elevation,
        ]);
        for t in all {
            assert_eq!(t.param_name().parse::<Target>().unwrap(), t);
        }
        assert!("field9".parse::<Target>().is_err());
    }
}
