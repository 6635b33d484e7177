//! The whole payload is one value.

use super::{Destination, ExtractError, Extracted, Extraction};
use crate::reading::Value;

#[derive(Debug, Clone)]
pub struct Plain {
    pub(super) destination: Destination,
}

impl Plain {
    pub(super) fn extract(&self, text: &str) -> Extraction {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Extraction {
                values: Vec::new(),
                errors: vec![ExtractError::Empty],
            };
        }
        match self.destination.apply(Value::from_text(trimmed)) {
            Ok(value) => Extraction {
                values: vec![Extracted {
                    channel: self.destination.channel,
                    target: self.destination.target,
                    value,
                    measured_at: None,
                }],
                errors: Vec::new(),
            },
            Err(e) => Extraction {
                values: Vec::new(),
                errors: vec![e],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingspeak::{ChannelId, Target};

    fn plain(scale: f64, offset: f64) -> Plain {
        Plain {
            destination: Destination {
                channel: ChannelId::new(1).unwrap(),
                target: Target::Status,
                scale,
                offset,
            },
        }
    }

    #[test]
    fn numbers_are_scaled_and_text_passes() {
        let out = plain(2.0, 1.0).extract(" 10\n");
        assert_eq!(out.values[0].value, Value::Number(21.0));
        let out = plain(2.0, 1.0).extract("door open");
        assert_eq!(out.values[0].value, Value::Text("door open".into()));
    }

    #[test]
    fn empty_payload_is_an_error() {
        assert_eq!(
            plain(1.0, 0.0).extract("  ").errors,
            vec![ExtractError::Empty]
        );
    }

    #[test]
    fn overflow_after_scaling_is_rejected() {
        let out = plain(1e308, 0.0).extract("1e10");
        assert!(matches!(out.errors[0], ExtractError::NotFinite { .. }));
    }
}
