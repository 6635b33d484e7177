//! The one metrics registry every stage reports into.
//!
//! All metric families are declared here, so names and labels stay consistent
//! across stages and no two crates can register the same name twice. Stages
//! receive a cloned [`Metrics`] handle (cheap: every family is reference counted)
//! and only ever increment what is theirs.
//!
//! Naming follows Prometheus conventions: `tsgw_` prefix, `_total` for
//! counters, base units (seconds, bytes).

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Handles to every metric family of the gateway.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,

    // --- sources -------------------------------------------------------------
    /// Readings produced by sources. Labels: source, device, result (`accepted` | `rejected`).
    pub readings_total: IntCounterVec,
    /// Payloads or lines that could not be turned into readings. Labels: source, device, reason.
    pub parse_errors_total: IntCounterVec,
    /// Device-level failures while polling or reading. Labels: source, device, kind
    /// (`timeout`, `io`, `exception`, `disconnect`, `overlong`, ...).
    pub device_errors_total: IntCounterVec,
    /// 1 while a device's port/connection is open and answering. Labels: source, device.
    pub device_up: IntGaugeVec,
    /// Clients connected to the embedded local MQTT broker.
    pub broker_connections: IntGauge,
    /// What the local broker's front refused: a CONNECT, a PUBLISH or a
    /// subscription. Labels: reason (`bad_credentials`, `anonymous`,
    /// `publish_denied`, `subscribe_denied`, `channel_not_allowed`, ...), user
    /// (the MQTT username, `anonymous`, or `unknown` for an unknown username).
    pub mqtt_denied_total: IntCounterVec,
    /// Drop-in publishes refused because the channel is not configured
    /// upstream or in `mqtt.drop_in.channels`. Labels: channel (the first
    /// few hundred distinct ids; later ones count as `other`).
    pub mqtt_refused_channel_total: IntCounterVec,
    /// Times a source had to wait because the queue writer was behind (the
    /// local broker then stops reading device sockets). Labels: source.
    pub ingest_backpressure_total: IntCounterVec,
    /// fsyncs the queue writer made for sources waiting on them (QoS 1
    /// PUBACKs); each covers every batch that waited (group commit).
    pub queue_group_commits_total: IntCounter,

    // --- durable queue -------------------------------------------------------
    /// Readings currently stored in the durable queue.
    pub queue_readings: IntGauge,
    /// Bytes of encoded readings currently stored in the durable queue.
    pub queue_bytes: IntGauge,
    /// Age of the oldest queued reading, seconds (0 when empty).
    pub queue_oldest_age_seconds: Gauge,
    /// Readings removed without delivery. Labels: reason (`full`, `corrupt`, `policy`, ...).
    pub queue_dropped_total: IntCounterVec,
    /// Times the store failed to open and was moved aside.
    pub queue_quarantined_total: IntCounter,

    // --- forwarder -----------------------------------------------------------
    /// Channel updates written upstream. Labels: channel.
    pub updates_sent_total: IntCounterVec,
    /// Channel updates confirmed by ThingSpeak's echo. Labels: channel.
    pub updates_confirmed_total: IntCounterVec,
    /// Channel updates sent again after no confirmation. Labels: channel.
    pub updates_retried_total: IntCounterVec,
    /// Channel updates given up on. Labels: channel, reason.
    pub updates_dropped_total: IntCounterVec,
    /// Updates in doubt (maybe stored by an earlier write, e.g. before a
    /// crash) and how each was settled. Labels: channel, resolution (`echo`,
    /// `read_api`, `duplicate`, `not_stored`, `stored_differs`).
    pub updates_in_doubt_total: IntCounterVec,
    /// Times a channel was parked (not sent for a while). Labels: channel, reason.
    pub channel_parked_total: IntCounterVec,
    /// 1 while a channel is parked. Labels: channel.
    pub channel_parked: IntGaugeVec,
    /// 1 while a connection upstream is established. Labels: connection.
    pub upstream_connected: IntGaugeVec,
    /// Successful connects upstream. Labels: connection.
    pub upstream_connects_total: IntCounterVec,
    /// Lost or closed upstream connections. Labels: connection, reason.
    pub upstream_disconnects_total: IntCounterVec,
    /// Unix time of the last update written upstream.
    pub upstream_last_publish_timestamp_seconds: Gauge,
    /// Unix time a channel's last update was written upstream (MQTT publish
    /// written, or bulk call accepted). Labels: channel.
    pub channel_last_sent_timestamp_seconds: GaugeVec,
    /// Unix time a channel's last update counted as delivered. Labels: channel.
    pub channel_last_confirmed_timestamp_seconds: GaugeVec,
    /// Unix time the channel's next update may go: the later of its oldest
    /// unsent window's close and its rate-limit slot; 0 with nothing to send.
    /// Labels: channel.
    pub channel_next_window_timestamp_seconds: GaugeVec,
    /// Readings in a channel's closed windows that wait behind its newest
    /// (the backlog still to backfill; 0 when caught up). Labels: channel.
    pub backfill_remaining_readings: IntGaugeVec,
    /// Closed windows of a channel that wait behind its newest. Labels: channel.
    pub backfill_remaining_windows: IntGaugeVec,

    // --- operations ----------------------------------------------------------
    /// Requests to the status page or tail feed refused for want of a user
    /// from `http.users`. Labels: reason (`no_credentials`, `malformed`,
    /// `unknown_user`, `bad_password`).
    pub http_denied_total: IntCounterVec,

    // --- process -------------------------------------------------------------
    /// Always 1; labels carry the version.
    pub build_info: IntGaugeVec,
    /// Config reloads. Labels: result (`applied` | `rejected`).
    pub config_reloads_total: IntCounterVec,
}

impl Metrics {
    /// Creates every family in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let float_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };

        let metrics = Metrics {
            readings_total: counter_vec(
                "tsgw_readings_total",
                "Readings produced by sources, by result.",
                &["source", "device", "result"],
            ),
            parse_errors_total: counter_vec(
                "tsgw_parse_errors_total",
                "Payloads or lines that could not be turned into readings.",
                &["source", "device", "reason"],
            ),
            device_errors_total: counter_vec(
                "tsgw_device_errors_total",
                "Device failures while polling or reading.",
                &["source", "device", "kind"],
            ),
            device_up: gauge_vec(
                "tsgw_device_up",
                "1 while the device's port or connection is open and answering.",
                &["source", "device"],
            ),
            broker_connections: int_gauge(
                "tsgw_broker_connections",
                "Clients connected to the local MQTT broker.",
            ),
            mqtt_denied_total: counter_vec(
                "tsgw_mqtt_denied_total",
                "Connects, publishes and subscriptions the local broker refused, by reason and user.",
                &["reason", "user"],
            ),
            mqtt_refused_channel_total: counter_vec(
                "tsgw_mqtt_refused_channel_total",
                "Drop-in publishes refused because their channel is not configured.",
                &["channel"],
            ),
            ingest_backpressure_total: counter_vec(
                "tsgw_ingest_backpressure_total",
                "Times a source waited for the queue writer.",
                &["source"],
            ),
            queue_group_commits_total: {
                let c = IntCounter::new(
                    "tsgw_queue_group_commits_total",
                    "Queue fsyncs made for sources waiting on them (group commit).",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            queue_readings: int_gauge("tsgw_queue_readings", "Readings in the durable queue."),
            queue_bytes: int_gauge(
                "tsgw_queue_bytes",
                "Bytes of encoded readings in the durable queue.",
            ),
            queue_oldest_age_seconds: gauge(
                "tsgw_queue_oldest_age_seconds",
                "Age of the oldest queued reading (0 when empty).",
            ),
            queue_dropped_total: counter_vec(
                "tsgw_queue_dropped_total",
                "Readings removed from the queue without delivery, by reason.",
                &["reason"],
            ),
            queue_quarantined_total: {
                let c = IntCounter::new(
                    "tsgw_queue_quarantined_total",
                    "Times the store could not be opened and was moved aside.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            updates_sent_total: counter_vec(
                "tsgw_updates_sent_total",
                "Channel updates written upstream.",
                &["channel"],
            ),
            updates_confirmed_total: counter_vec(
                "tsgw_updates_confirmed_total",
                "Channel updates confirmed by ThingSpeak.",
                &["channel"],
            ),
            updates_retried_total: counter_vec(
                "tsgw_updates_retried_total",
                "Channel updates sent again.",
                &["channel"],
            ),
            updates_dropped_total: counter_vec(
                "tsgw_updates_dropped_total",
                "Channel updates given up on, by reason.",
                &["channel", "reason"],
            ),
            updates_in_doubt_total: counter_vec(
                "tsgw_updates_in_doubt_total",
                "Updates in doubt (maybe stored by an earlier write), by how each was settled.",
                &["channel", "resolution"],
            ),
            channel_parked_total: counter_vec(
                "tsgw_channel_parked_total",
                "Times a channel was parked (not sent for a while), by reason.",
                &["channel", "reason"],
            ),
            channel_parked: gauge_vec(
                "tsgw_channel_parked",
                "1 while the channel is parked.",
                &["channel"],
            ),
            upstream_connected: gauge_vec(
                "tsgw_upstream_connected",
                "1 while the upstream connection is established.",
                &["connection"],
            ),
            upstream_connects_total: counter_vec(
                "tsgw_upstream_connects_total",
                "Successful upstream connects.",
                &["connection"],
            ),
            upstream_disconnects_total: counter_vec(
                "tsgw_upstream_disconnects_total",
                "Lost or closed upstream connections, by reason.",
                &["connection", "reason"],
            ),
            upstream_last_publish_timestamp_seconds: gauge(
                "tsgw_upstream_last_publish_timestamp_seconds",
                "Unix time of the last update written upstream.",
            ),
            channel_last_sent_timestamp_seconds: float_gauge_vec(
                "tsgw_channel_last_sent_timestamp_seconds",
                "Unix time the channel's last update was written upstream.",
                &["channel"],
            ),
            channel_last_confirmed_timestamp_seconds: float_gauge_vec(
                "tsgw_channel_last_confirmed_timestamp_seconds",
                "Unix time the channel's last update counted as delivered.",
                &["channel"],
            ),
            channel_next_window_timestamp_seconds: float_gauge_vec(
                "tsgw_channel_next_window_timestamp_seconds",
                "Unix time the channel's next update may go (0: nothing to send).",
                &["channel"],
            ),
            backfill_remaining_readings: gauge_vec(
                "tsgw_backfill_remaining_readings",
                "Readings in closed windows waiting behind the channel's newest.",
                &["channel"],
            ),
            backfill_remaining_windows: gauge_vec(
                "tsgw_backfill_remaining_windows",
                "Closed windows waiting behind the channel's newest.",
                &["channel"],
            ),
            http_denied_total: counter_vec(
                "tsgw_http_denied_total",
                "Status page and tail requests refused for want of a user from http.users, by reason.",
                &["reason"],
            ),
            build_info: gauge_vec(
                "tsgw_build_info",
                "Always 1; the labels carry the build's version.",
                &["version"],
            ),
            config_reloads_total: counter_vec(
                "tsgw_config_reloads_total",
                "Config reloads, by result.",
                &["result"],
            ),
            registry: registry.clone(),
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        metrics
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every family in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).expect("prometheus text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.readings_total
            .with_label_values(&["mqtt", "esp1", "accepted"])
            .inc_by(3);
        let text = m.render();
        assert!(text
            .contains(r#"tsgw_readings_total{device="esp1",result="accepted",source="mqtt"} 3"#));
        assert!(text.contains("tsgw_build_info{version="));
    }

    #[test]
    fn two_registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.queue_readings.set(5);
        assert_eq!(b.queue_readings.get(), 0);
    }
}
