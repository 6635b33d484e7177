//! Reads every publish from the embedded broker and turns it into readings.

use chrono::Utc;
use rumqttd::local::LinkRx;
use rumqttd::Notification;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};
use tsgw_core::extract::{ExtractError, Extracted};
use tsgw_core::throttle::LogThrottle;
use tsgw_core::{Metrics, Origin, Reading, SourceKind};

use crate::config::DropInConfig;
use crate::dropin;
use crate::rules::Rules;

/// The mapping in force; replaced as a whole on config reload.
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    pub rules: Rules,
    pub drop_in: DropInConfig,
}

/// The `device` label for drop-in publishes and for topics no rule matched.
const DROP_IN_DEVICE: &str = "drop_in";
const UNMAPPED_DEVICE: &str = "unmapped";

pub struct Ingest {
    pub link_rx: LinkRx,
    pub mapping: watch::Receiver<Arc<Mapping>>,
    pub readings: mpsc::Sender<Reading>,
    pub metrics: Metrics,
    pub throttle: LogThrottle,
}

impl Ingest {
    pub fn new(
        link_rx: LinkRx,
        mapping: watch::Receiver<Arc<Mapping>>,
        readings: mpsc::Sender<Reading>,
        metrics: Metrics,
    ) -> Self {
        Self {
            link_rx,
            mapping,
            readings,
            metrics,
            throttle: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let notification = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = self.link_rx.next() => n,
            };
            match notification {
                Ok(Some(Notification::Forward(forward))) => {
                    let publish = forward.publish;
                    if !self.handle(&publish.topic, &publish.payload).await {
                        return;
                    }
                }
                // The router pauses a link after a burst of forwards until it
                // says it is ready again; without this, ingest silently stops.
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = self.link_rx.wake().await {
                        error!(error = %e, "embedded broker router is gone; MQTT ingest stops");
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    error!(error = %e, "embedded broker router is gone; MQTT ingest stops");
                    return;
                }
            }
        }
    }

    /// Returns false when the reading channel is closed (the gateway is stopping).
    async fn handle(&mut self, topic: &[u8], payload: &[u8]) -> bool {
        let Ok(topic) = std::str::from_utf8(topic) else {
            // rumqttd rejects non-UTF-8 topics itself; this is belt and braces.
            self.count_error(UNMAPPED_DEVICE, "bad_topic");
            return true;
        };
        let mapping = self.mapping.borrow().clone();
        let (device, extracted, errors): (&str, Vec<Extracted>, Vec<(String, &'static str)>) =
            if mapping.drop_in.enabled && dropin::is_thingspeak_topic(topic) {
                match dropin::extract(&mapping.drop_in, topic, payload) {
                    Ok(values) => (DROP_IN_DEVICE, values, Vec::new()),
                    Err(e) => (
                        DROP_IN_DEVICE,
                        Vec::new(),
                        vec![(e.to_string(), e.reason())],
                    ),
                }
            } else if let Some(rule) = mapping.rules.find(topic) {
                let out = rule.apply(payload);
                let errors = out
                    .errors
                    .iter()
                    .map(|e: &ExtractError| (e.to_string(), e.reason()))
                    .collect();
                (rule.name.as_str(), out.values, errors)
            } else {
                self.count_error(UNMAPPED_DEVICE, "unmapped_topic");
                if let Some(suppressed) = self.throttle.check(&format!("unmapped:{topic}")) {
                    warn!(topic = %printable(topic), suppressed, "no mqtt.rules entry matches this topic; message ignored");
                }
                return true;
            };

        for (message, reason) in &errors {
            self.count_error(device, reason);
            self.metrics
                .readings_total
                .with_label_values(&["mqtt", device, "rejected"])
                .inc();
            if let Some(suppressed) = self.throttle.check(&format!("{device}:{reason}")) {
                warn!(device, topic = %printable(topic), suppressed, "{message}");
            }
        }

        let now = Utc::now();
        for value in extracted {
            let reading = Reading {
                channel: value.channel,
                target: value.target,
                value: value.value,
                measured_at: value.measured_at.unwrap_or(now),
                origin: Origin::new(SourceKind::Mqtt, device),
            };
            if self.readings.send(reading).await.is_err() {
                return false;
            }
            self.metrics
                .readings_total
                .with_label_values(&["mqtt", device, "accepted"])
                .inc();
        }
        true
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
