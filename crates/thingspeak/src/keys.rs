//! ThingSpeak API keys (write and read keys used by the legacy topics and REST).
//!
//! A key is a credential: `Debug` shows only its last two characters so keys
//! never reach a log line in full. `Display` and serde give the real key,
//! because building a topic or a request body needs it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest key accepted. ThingSpeak's keys are 16 characters; this leaves room
/// for test setups without letting a topic segment grow unbounded.
pub const MAX_KEY_LEN: usize = 64;

/// Why a string is not an API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("API key is empty")]
    Empty,
    #[error("API key is {0} characters long, at most {MAX_KEY_LEN} are allowed")]
    TooLong(usize),
    #[error("API key may contain only ASCII letters and digits")]
    BadCharacter,
}

fn check_key(s: &str) -> Result<(), KeyError> {
    if s.is_empty() {
        return Err(KeyError::Empty);
    }
    if s.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(s.len()));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(KeyError::BadCharacter);
    }
    Ok(())
}

/// Writes `Name(****XY)`: enough to tell two keys apart in a log, not enough to use one.
fn fmt_masked(name: &str, key: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    // Keys are ASCII (checked at construction), so byte slicing is on char boundaries.
    let tail = if key.len() >= 8 {
        &key[key.len() - 2..]
    } else {
        ""
    };
    write!(f, "{name}(****{tail})")
}

macro_rules! api_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(key: impl Into<String>) -> Result<Self, KeyError> {
                let key = key.into();
                check_key(&key)?;
                Ok(Self(key))
            }

            /// The key itself. Every use is visible in review: never log it.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt_masked(stringify!($name), &self.0, f)
            }
        }

        /// The real key, for building topics and request bodies.
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(s: &str) -> Result<Self, KeyError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

api_key!(
    /// A channel's Write API key.
    WriteKey
);
api_key!(
    /// A channel's Read API key.
    ReadKey
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_key() {
        let k = WriteKey::new("ABCDEFGHIJKLMNOP").unwrap();
        assert_eq!(format!("{k:?}"), "WriteKey(****OP)");
        let short = ReadKey::new("AB12").unwrap();
        assert_eq!(format!("{short:?}"), "ReadKey(****)");
        assert_eq!(k.to_string(), "ABCDEFGHIJKLMNOP");
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(WriteKey::new(""), Err(KeyError::Empty));
        assert_eq!(WriteKey::new("a/b"), Err(KeyError::BadCharacter));
        assert_eq!(WriteKey::new("a+"), Err(KeyError::BadCharacter));
        assert_eq!(WriteKey::new("x".repeat(65)), Err(KeyError::TooLong(65)));
    }

    #[test]
    fn serde_carries_the_real_key() {
        let k = WriteKey::new("K1").unwrap();
        assert_eq!(serde_json::to_string(&k).unwrap(), "\"K1\"");
        assert!(serde_json::from_str::<WriteKey>("\"\"").is_err());
    }
}
