//! Drop-in subscribe: ThingSpeak's channel feeds relayed to the local devices
//! that subscribed to them, in ThingSpeak's formats.
//!
//! The upstream subscription (one per channel, shared) belongs to the
//! forwarder; the front gets a tap per granted filter and writes each entry
//! to the device as ThingSpeak would: the entry's JSON, byte for byte as
//! ThingSpeak relayed it, on a feed topic (`channels/<id>/subscribe`,
//! `.../subscribe/json/<readKey>`), the bare value of each set field on a
//! field topic (`.../subscribe/fields/field<n>[/<readKey>]`, or `fields/+`).
//! Like ThingSpeak, a new subscription first gets the channel's newest entry.
//! QoS 0, as ThingSpeak sends. rumqttd never sees these subscriptions.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use thingspeak::topic::{FieldFilter, Topic};
use thingspeak::{Field, Target};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tsgw_core::{FeedEntry, FeedTap};

use super::session::ToDevice;

/// The relays of one connection's feed subscriptions, by filter. Dropping it
/// (the connection ended) stops them.
#[derive(Default)]
pub(super) struct Taps {
    relays: HashMap<String, JoinHandle<()>>,
}

impl Taps {
    /// A subscription to a filter already held replaces it (MQTT 3.1.1).
    pub(super) fn start(&mut self, filter: String, relay: JoinHandle<()>) {
        if let Some(old) = self.relays.insert(filter, relay) {
            old.abort();
        }
    }

    /// Stops the relay of `filter`; false if it was not a feed of this connection.
    pub(super) fn stop(&mut self, filter: &str) -> bool {
        match self.relays.remove(filter) {
            Some(relay) => {
                relay.abort();
                true
            }
            None => false,
        }
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        for relay in self.relays.values() {
            relay.abort();
        }
    }
}

/// The `mqtt_denied_total` reason of a feed the gateway cannot serve.
pub(super) fn refusal_label(reason: &str) -> &'static str {
    match reason {
        "no_credentials" => "feed_no_credentials",
        "upstream_refused" => "feed_upstream_refused",
        "read_key" => "feed_read_key",
        "too_many_feeds" => "feed_too_many",
        _ => "feed_unavailable",
    }
}

/// Relays a feed to the device until the connection or the subscription ends.
pub(super) async fn relay(topic: Topic, mut tap: FeedTap, to_device: mpsc::Sender<ToDevice>) {
    let mut sent_up_to = 0;
    let mut next = tap.last.take();
    loop {
        let entry = match next.take() {
            Some(entry) => entry,
            None => match tap.entries.recv().await {
                Ok(entry) => entry,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(
                        topic = %topic.redacted(),
                        missed,
                        "a local subscriber reads too slowly; feed entries not relayed to it"
                    );
                    continue;
                }
                Err(RecvError::Closed) => return,
            },
        };
        if entry.entry_id <= sent_up_to {
            continue;
        }
        sent_up_to = entry.entry_id;
        let mut frames = BytesMut::new();
        for (topic, payload) in messages_for(&topic, &entry) {
            let publish = Publish::from_bytes(topic, QoS::AtMostOnce, payload);
            if publish.write(&mut frames).is_err() {
                // Only a topic MQTT cannot express; the device's own topic never is.
                return;
            }
        }
        if frames.is_empty() {
            continue;
        }
        let frames = ToDevice {
            frames,
            durable: None,
        };
        if to_device.send(frames).await.is_err() {
            return;
        }
    }
}

/// What ThingSpeak sends a subscriber of `topic` for `entry`.
pub(super) fn messages_for(topic: &Topic, entry: &FeedEntry) -> Vec<(String, Bytes)> {
    match topic {
        Topic::Subscribe { .. } | Topic::SubscribeJson { .. } => {
            vec![(topic.to_string(), entry.json.clone())]
        }
        Topic::SubscribeFields {
            channel,
            fields,
            key,
        } => Field::all()
            .filter(|f| fields.matches(*f))
            .filter_map(|f| {
                let value = entry.entry.get(Target::Field(f))?;
                let t = Topic::SubscribeFields {
                    channel: *channel,
                    fields: FieldFilter::One(f),
                    key: key.clone(),
                };
                Some((t.to_string(), Bytes::copy_from_slice(value.as_bytes())))
            })
            .collect(),
        Topic::Publish { .. } | Topic::PublishField { .. } => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry() -> FeedEntry {
        let json = Bytes::from_static(
            br#"{"channel_id":7,"created_at":"2026-01-01T00:00:00Z","entry_id":4,"field1":"21.5","field3":"on","field2":null}"#,
        );
        let parsed: thingspeak::EntryJson = serde_json::from_slice(&json).unwrap();
        FeedEntry {
            channel: parsed.channel_id,
            entry_id: 4,
            json,
            entry: Arc::new(parsed),
        }
    }

    #[test]
    fn feed_topics_get_the_json_as_relayed_and_field_topics_bare_values() {
        let e = entry();
        let feed = Topic::parse("channels/7/subscribe").unwrap();
        assert_eq!(
            messages_for(&feed, &e),
            vec![("channels/7/subscribe".into(), e.json.clone())]
        );
        let legacy = Topic::parse("channels/7/subscribe/json/RKEY").unwrap();
        assert_eq!(
            messages_for(&legacy, &e)[0].0,
            "channels/7/subscribe/json/RKEY"
        );
        let one = Topic::parse("channels/7/subscribe/fields/field1/RKEY").unwrap();
        assert_eq!(
            messages_for(&one, &e),
            vec![(
                "channels/7/subscribe/fields/field1/RKEY".into(),
                Bytes::from_static(b"21.5")
            )]
        );
        let unset = Topic::parse("channels/7/subscribe/fields/field2").unwrap();
        assert!(messages_for(&unset, &e).is_empty());
        let all = Topic::parse("channels/7/subscribe/fields/+").unwrap();
        let topics: Vec<String> = messages_for(&all, &e).into_iter().map(|m| m.0).collect();
        assert_eq!(
            topics,
            [
                "channels/7/subscribe/fields/field1",
                "channels/7/subscribe/fields/field3"
            ]
        );
    }
}
