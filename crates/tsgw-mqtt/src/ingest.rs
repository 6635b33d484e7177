//! Decides what one device PUBLISH means: which readings it carries, whether
//! the device may send it, and under which topic local subscribers see it.
//!
//! Pure decisions plus counting: the front calls this for every PUBLISH it
//! reads and does the I/O (queue hand-over, relaying, acks) itself.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use thingspeak::ChannelId;
use tracing::warn;
use tsgw_core::extract::Extracted;
use tsgw_core::throttle::LogThrottle;
use tsgw_core::{Metrics, Origin, Reading, SourceKind};

use crate::auth::{Accounts, Identity};
use crate::config::DropInConfig;
use crate::dropin;
use crate::rules::Rules;

/// The mapping and access policy in force; replaced as a whole on config reload.
#[derive(Debug, Default)]
pub struct Mapping {
    pub rules: Rules,
    pub drop_in: DropInConfig,
    /// Channels drop-in publishes may write: `mqtt.drop_in.channels`, or if
    /// that is empty, the channels the upstream config names.
    pub drop_in_channels: BTreeSet<ChannelId>,
    pub accounts: Accounts,
}

/// The `device` label for anonymous drop-in publishes and for topics no rule matched.
pub const DROP_IN_DEVICE: &str = "drop_in";
const UNMAPPED_DEVICE: &str = "unmapped";

/// Distinct refused channel ids counted under their own label; later ones
/// count as `other`, so a device cannot grow the metrics without bound.
const REFUSED_CHANNEL_LABELS: usize = 256;

/// What to do with one PUBLISH.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Queue `readings` (possibly none: an unmapped or unparsable topic is
    /// still local traffic) and relay the publish to local subscribers under
    /// `relay_topic` when set (a legacy topic without its write key), else
    /// under its own topic.
    Accept {
        readings: Vec<Reading>,
        relay_topic: Option<String>,
    },
    /// Refused by policy: neither queued nor relayed. Counted and logged.
    Deny,
}

/// Classifies publishes and counts what it refuses. Shared by every connection.
pub struct Ingest {
    metrics: Metrics,
    throttle: LogThrottle,
    refused_channels: Mutex<HashSet<ChannelId>>,
}

impl Ingest {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            throttle: LogThrottle::new(Duration::from_secs(10)),
            refused_channels: Mutex::new(HashSet::new()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn publish(
        &self,
        mapping: &Mapping,
        identity: &Identity,
        topic: &str,
        payload: &[u8],
        now: DateTime<Utc>,
    ) -> Verdict {
        if mapping.drop_in.enabled && dropin::is_thingspeak_topic(topic) {
            return self.drop_in(mapping, identity, topic, payload, now);
        }
        if !identity.acl.may_publish_topic(topic) {
            self.deny(identity, "publish_denied", topic);
            return Verdict::Deny;
        }
        let readings = match mapping.rules.find(topic) {
            Some(rule) => {
                let out = rule.apply(payload);
                for error in &out.errors {
                    self.rejected(&rule.name, topic, error.reason(), &error.to_string());
                }
                self.readings(&rule.name, out.values, now)
            }
            None => {
                self.count_error(UNMAPPED_DEVICE, "unmapped_topic");
                if let Some(suppressed) = self.throttle.check(&format!("unmapped:{topic}")) {
                    warn!(topic = %printable(topic), suppressed, "no mqtt.rules entry matches this topic; relayed to local subscribers only, not queued");
                }
                Vec::new()
            }
        };
        Verdict::Accept {
            readings,
            relay_topic: None,
        }
    }

    fn drop_in(
        &self,
        mapping: &Mapping,
        identity: &Identity,
        topic: &str,
        payload: &[u8],
        now: DateTime<Utc>,
    ) -> Verdict {
        let device = identity.user.as_deref().unwrap_or(DROP_IN_DEVICE);
        let parsed = match dropin::publish_topic(topic) {
            Ok(parsed) => parsed,
            Err(e) => {
                // Not a ThingSpeak publish topic: nobody may relay into that
                // namespace (a local `channels/1/subscribe` publish would fake
                // a ThingSpeak entry to the channel's subscribers).
                self.rejected(device, topic, e.reason(), &e.to_string());
                return Verdict::Deny;
            }
        };
        let channel = parsed.channel();
        if !mapping.drop_in_channels.contains(&channel) {
            self.refused_channel(identity, channel, mapping);
            return Verdict::Deny;
        }
        if !identity.acl.may_publish_channel(channel) {
            self.deny(identity, "publish_denied", topic);
            return Verdict::Deny;
        }
        let relay_topic = parsed.has_key().then(|| parsed.without_key().to_string());
        let readings = match dropin::extract(&parsed, payload) {
            Ok(values) => self.readings(device, values, now),
            Err(e) => {
                self.rejected(device, topic, e.reason(), &e.to_string());
                Vec::new()
            }
        };
        Verdict::Accept {
            readings,
            relay_topic,
        }
    }

    fn readings(&self, device: &str, values: Vec<Extracted>, now: DateTime<Utc>) -> Vec<Reading> {
        if values.is_empty() {
            return Vec::new();
        }
        self.metrics
            .readings_total
            .with_label_values(&["mqtt", device, "accepted"])
            .inc_by(values.len() as u64);
        values
            .into_iter()
            .map(|value| Reading {
                channel: value.channel,
                target: value.target,
                value: value.value,
                measured_at: value.measured_at.unwrap_or(now),
                origin: Origin::new(SourceKind::Mqtt, device),
            })
            .collect()
    }

    /// A payload or topic that yields no reading: counted as a parse error.
    fn rejected(&self, device: &str, topic: &str, reason: &str, message: &str) {
        self.count_error(device, reason);
        self.metrics
            .readings_total
            .with_label_values(&["mqtt", device, "rejected"])
            .inc();
        if let Some(suppressed) = self.throttle.check(&format!("{device}:{reason}")) {
            warn!(device, topic = %printable(topic), suppressed, "{message}");
        }
    }

    /// A publish the client's permissions do not allow.
    pub fn deny(&self, identity: &Identity, reason: &str, topic: &str) {
        self.metrics
            .mqtt_denied_total
            .with_label_values(&[reason, identity.name()])
            .inc();
        if let Some(suppressed) = self
            .throttle
            .check(&format!("deny:{reason}:{}", identity.name()))
        {
            warn!(user = identity.name(), topic = %printable(topic), reason, suppressed, "local MQTT client refused");
        }
    }

    fn refused_channel(&self, identity: &Identity, channel: ChannelId, mapping: &Mapping) {
        self.metrics
            .mqtt_denied_total
            .with_label_values(&["channel_not_allowed", identity.name()])
            .inc();
        let label = {
            let mut seen = self
                .refused_channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if seen.contains(&channel) || seen.len() < REFUSED_CHANNEL_LABELS {
                seen.insert(channel);
                channel.to_string()
            } else {
                "other".to_owned()
            }
        };
        self.metrics
            .mqtt_refused_channel_total
            .with_label_values(&[&label])
            .inc();
        if let Some(suppressed) = self.throttle.check(&format!("refused:{channel}")) {
            let fix = if mapping.drop_in.channels.is_empty() {
                format!("add [upstream.channels.{channel}] to the config (or list it in mqtt.drop_in.channels)")
            } else {
                format!("add {channel} to mqtt.drop_in.channels")
            };
            warn!(user = identity.name(), %channel, suppressed, "drop-in publish refused: the gateway does not forward to channel {channel}; {fix}");
        }
    }

    fn count_error(&self, device: &str, reason: &str) {
        self.metrics
            .parse_errors_total
            .with_label_values(&["mqtt", device, reason])
            .inc();
    }
}

/// Topics come from devices: cap what goes into a log line, and hide the
/// write or read key that legacy ThingSpeak topics carry in their last level.
fn printable(topic: &str) -> String {
    const MAX: usize = 128;
    let redacted;
    let topic = if dropin::is_thingspeak_topic(topic) {
        redacted = redact_thingspeak_key(topic);
        redacted.as_str()
    } else {
        topic
    };
    let shown: String = topic.chars().take(MAX).collect();
    if shown.len() < topic.len() {
        format!("{shown}… ({} bytes)", topic.len())
    } else {
        shown
    }
}

/// Keeps the structural levels of a ThingSpeak topic and masks anything that may be a key.
fn redact_thingspeak_key(topic: &str) -> String {
    const STRUCTURAL: [&str; 5] = ["channels", "publish", "subscribe", "fields", "json"];
    topic
        .split('/')
        .enumerate()
        .map(|(i, level)| {
            let keep = i == 1
                || STRUCTURAL.contains(&level)
                || level == "+"
                || (level.starts_with("field") && level.len() <= 7);
            if keep {
                level
            } else {
                "<key>"
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Acl;
    use std::sync::Arc;

    fn anonymous() -> Identity {
        Identity {
            user: None,
            acl: Arc::new(Acl::default()),
        }
    }

    fn mapping(upstream: &[u64]) -> Mapping {
        Mapping {
            drop_in: DropInConfig::default(),
            drop_in_channels: upstream
                .iter()
                .map(|&c| ChannelId::new(c).unwrap())
                .collect(),
            ..Mapping::default()
        }
    }

    #[test]
    fn drop_in_accepts_only_the_upstream_channels() {
        let ingest = Ingest::new(Metrics::new());
        let map = mapping(&[42]);
        let now = Utc::now();
        match ingest.publish(&map, &anonymous(), "channels/42/publish", b"field1=1", now) {
            Verdict::Accept {
                readings,
                relay_topic,
            } => {
                assert_eq!(readings.len(), 1);
                assert_eq!(readings[0].origin.device, DROP_IN_DEVICE);
                assert_eq!(relay_topic, None);
            }
            Verdict::Deny => panic!("a configured channel was refused"),
        }
        assert_eq!(
            ingest.publish(&map, &anonymous(), "channels/43/publish", b"field1=1", now),
            Verdict::Deny
        );
        let m = ingest.metrics();
        assert_eq!(
            m.mqtt_refused_channel_total
                .with_label_values(&["43"])
                .get(),
            1
        );
        assert_eq!(
            m.mqtt_denied_total
                .with_label_values(&["channel_not_allowed", "anonymous"])
                .get(),
            1
        );
    }

    #[test]
    fn legacy_keys_are_stripped_from_the_relayed_topic() {
        let ingest = Ingest::new(Metrics::new());
        let verdict = ingest.publish(
            &mapping(&[42]),
            &anonymous(),
            "channels/42/publish/fields/field2/ABCDEFGHIJKLMNOP",
            b"5",
            Utc::now(),
        );
        let Verdict::Accept { relay_topic, .. } = verdict else {
            panic!("refused");
        };
        assert_eq!(
            relay_topic.as_deref(),
            Some("channels/42/publish/fields/field2")
        );
    }

    #[test]
    fn refused_channel_labels_are_bounded() {
        let ingest = Ingest::new(Metrics::new());
        let map = mapping(&[]);
        for c in 1..=(REFUSED_CHANNEL_LABELS as u64 + 10) {
            let topic = format!("channels/{c}/publish");
            ingest.publish(&map, &anonymous(), &topic, b"field1=1", Utc::now());
        }
        assert_eq!(
            ingest
                .metrics()
                .mqtt_refused_channel_total
                .with_label_values(&["other"])
                .get(),
            10
        );
    }

    #[test]
    fn nothing_may_be_published_into_thingspeaks_subscribe_topics() {
        let ingest = Ingest::new(Metrics::new());
        assert_eq!(
            ingest.publish(
                &mapping(&[42]),
                &anonymous(),
                "channels/42/subscribe",
                b"{}",
                Utc::now()
            ),
            Verdict::Deny
        );
    }

    #[test]
    fn legacy_keys_never_reach_logs() {
        let shown = printable("channels/42/publish/fields/field1/SECRETKEY123");
        assert_eq!(shown, "channels/42/publish/fields/field1/<key>");
        assert_eq!(
            printable("channels/42/publish/SECRETKEY123"),
            "channels/42/publish/<key>"
        );
        assert_eq!(printable("sensors/a"), "sensors/a");
    }

    #[test]
    fn long_topics_are_cut() {
        let long = "x".repeat(10_000);
        assert!(printable(&long).len() < 200);
    }
}
