//! Drop-in mode: devices written for ThingSpeak publish to the gateway with
//! their unchanged topics and payloads. Keys in legacy topics are not checked
//! here (the gateway authenticates upstream with its own credentials), never
//! logged and never relayed to local subscribers. Which channels are accepted
//! is the front's policy (`ingest`), not this parser's.

use thingspeak::payload::{parse_field_value, ChannelUpdate};
use thingspeak::topic::Topic;
use thingspeak::Target;
use tsgw_core::extract::Extracted;
use tsgw_core::Value;

/// Why a drop-in publish was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DropInError {
    #[error("{0}")]
    Topic(String),
    #[error("topic {0:?} is a subscribe topic; devices can only publish through the gateway")]
    NotPublish(String),
    #[error("payload: {0}")]
    Payload(String),
}

impl DropInError {
    pub fn reason(&self) -> &'static str {
        match self {
            DropInError::Topic(_) => "bad_topic",
            DropInError::NotPublish(_) => "not_publish",
            DropInError::Payload(_) => "bad_payload",
        }
    }
}

/// Whether a topic is in ThingSpeak's namespace (and so handled here, not by rules).
pub fn is_thingspeak_topic(topic: &str) -> bool {
    topic.starts_with("channels/")
}

/// Parses a ThingSpeak topic that a device published to.
pub fn publish_topic(topic: &str) -> Result<Topic, DropInError> {
    let parsed = Topic::parse(topic).map_err(|e| DropInError::Topic(e.to_string()))?;
    if parsed.is_publish() {
        Ok(parsed)
    } else {
        Err(DropInError::NotPublish(parsed.redacted()))
    }
}

/// Parses a ThingSpeak publish into values.
pub fn extract(topic: &Topic, payload: &[u8]) -> Result<Vec<Extracted>, DropInError> {
    let channel = topic.channel();
    match topic {
        Topic::Publish { .. } => {
            let update =
                ChannelUpdate::parse(payload).map_err(|e| DropInError::Payload(e.to_string()))?;
            Ok(update
                .values
                .iter()
                .map(|(target, text)| Extracted {
                    channel,
                    target: *target,
                    value: Value::from_text(text),
                    measured_at: update.created_at,
                })
                .collect())
        }
        Topic::PublishField { field, .. } => {
            let field = *field;
            let text = parse_field_value(field, payload)
                .map_err(|e| DropInError::Payload(e.to_string()))?;
            Ok(vec![Extracted {
                channel,
                target: Target::Field(field),
                value: Value::from_text(&text),
                measured_at: None,
            }])
        }
        other => Err(DropInError::NotPublish(other.redacted())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingspeak::ChannelId;

    fn extract(topic: &str, payload: &[u8]) -> Result<Vec<Extracted>, DropInError> {
        super::extract(&publish_topic(topic)?, payload)
    }

    #[test]
    fn channel_feed_with_created_at() {
        let out = extract(
            "channels/42/publish",
            b"field1=21.5&field2=40&status=ok&created_at=2026-01-02T03:04:05Z",
        )
        .unwrap();
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|e| e.channel.get() == 42));
        assert!(out.iter().all(|e| e.measured_at.is_some()));
        assert!(out.contains(&Extracted {
            channel: ChannelId::new(42).unwrap(),
            target: "field1".parse().unwrap(),
            value: Value::Number(21.5),
            measured_at: out[0].measured_at,
        }));
    }

    #[test]
    fn legacy_field_topic_with_key() {
        let out = extract("channels/42/publish/fields/field3/ABCDEF0123456789", b"7").unwrap();
        assert_eq!(out[0].target.to_string(), "field3");
        assert_eq!(out[0].value, Value::Number(7.0));
    }

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(
            extract("channels/42/publish/fields/field9", b"1")
                .unwrap_err()
                .reason(),
            "bad_topic"
        );
        assert_eq!(
            extract("channels/42/subscribe", b"").unwrap_err().reason(),
            "not_publish"
        );
        assert_eq!(
            extract("channels/42/publish", b"field1=1&bogus=2")
                .unwrap_err()
                .reason(),
            "bad_payload"
        );
    }
}
