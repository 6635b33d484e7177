//! Everything the status page shows, gathered into plain values at one
//! moment: from the metrics registry, the recent-readings tracker, the
//! counter history, the queue and the config. Rendering is separate
//! ([`super::page`]), so both are tested on their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use tsgw_core::{ChannelId, ReadingStore, SourceKind, Target};
use tsgw_queue::{OpenPhase, OpenState};

use super::families::Families;
use super::history::{Disconnect, History};
use super::recent::{Bucket, RecentSnapshot};

/// An MQTT device whose last reading is younger than this counts as receiving.
pub const MQTT_RECEIVING: Duration = Duration::from_secs(300);

/// What the config says exists, for rows that must show before any traffic.
#[derive(Debug, Clone, Default)]
pub struct ConfiguredView {
    /// Serial ports, Modbus units, MQTT accounts and rules.
    pub devices: BTreeSet<(SourceKind, String)>,
    /// Channels the upstream config names.
    pub channels: BTreeSet<ChannelId>,
    pub queue_dir: PathBuf,
    pub queue_max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusPage {
    pub now: DateTime<Utc>,
    pub started: DateTime<Utc>,
    pub devices: Vec<DeviceRow>,
    pub channels: Vec<ChannelRow>,
    pub upstream: UpstreamView,
    pub queue: QueueView,
    pub plots: Vec<Plot>,
    /// Numbers not plotted because too many fields are plotted already.
    pub unplotted: u64,
    pub downlink: DownlinkView,
}

/// ThingSpeak's channel feeds (drop-in subscribers, downlink rules) and the
/// `[[downlink]]` rules' outcomes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DownlinkView {
    pub feeds: Vec<FeedRow>,
    pub rules: Vec<RuleRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FeedRow {
    pub channel: String,
    pub subscribed: bool,
    pub entries: u64,
    pub filled: u64,
    pub missed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleRow {
    pub rule: String,
    pub received: u64,
    pub applied: u64,
    pub refused: Vec<ErrorCount>,
    pub failed: Vec<ErrorCount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// A polled device (serial, Modbus) that answers.
    Up,
    /// A polled device that does not answer (or its port is closed).
    Down,
    /// An MQTT device with a reading in the last [`MQTT_RECEIVING`].
    Receiving,
    /// An MQTT device whose last reading is older.
    Quiet,
    /// Nothing heard yet.
    Unknown,
}

impl DeviceState {
    pub fn label(self) -> &'static str {
        match self {
            DeviceState::Up => "up",
            DeviceState::Down => "down",
            DeviceState::Receiving => "receiving",
            DeviceState::Quiet => "quiet",
            DeviceState::Unknown => "no readings yet",
        }
    }
}

/// Errors of one reason: in the last hour and since start.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorCount {
    pub reason: String,
    pub last_hour: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub source: SourceKind,
    pub name: String,
    pub configured: bool,
    pub state: DeviceState,
    pub last_stored: Option<DateTime<Utc>>,
    pub last_measured: Option<DateTime<Utc>>,
    /// `("1001 field1", "21.5")`, in channel and target order.
    pub values: Vec<(String, String)>,
    pub accepted: u64,
    pub rejected: u64,
    pub errors: Vec<ErrorCount>,
    /// For an MQTT account: the mapping rule its last reading went through
    /// (its readings show under the rule's row).
    pub via: Option<Via>,
}

/// The rule an MQTT account last published through, and to which channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Via {
    pub rule: String,
    pub channel: ChannelId,
    /// Readings the account sent through rules since the gateway started.
    pub readings: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRow {
    pub channel: ChannelId,
    pub last_sent: Option<DateTime<Utc>>,
    pub last_confirmed: Option<DateTime<Utc>>,
    /// When its next update may go; `None` with nothing to send.
    pub next_window: Option<DateTime<Utc>>,
    pub queued: Option<u64>,
    pub oldest_queued: Option<DateTime<Utc>>,
    pub backlog_readings: u64,
    pub backlog_windows: u64,
    pub sent: u64,
    pub confirmed: u64,
    pub dropped: Vec<ErrorCount>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamView {
    /// Connection name and whether it is connected.
    pub connections: Vec<(String, bool)>,
    pub last_disconnect: Option<Disconnect>,
    pub disconnects: Vec<ErrorCount>,
    pub last_publish: Option<DateTime<Utc>>,
    pub backfill: Vec<BackfillRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackfillRow {
    pub channel: String,
    pub readings: u64,
    pub windows: u64,
    /// Readings a second over the last minute; `None` until measured.
    pub rate: Option<f64>,
    /// At that rate; `None` when it does not shrink.
    pub eta: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueView {
    pub open: OpenState,
    pub readings: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_age: Option<Duration>,
    pub dir: PathBuf,
    /// Bytes the store's files take on disk.
    pub disk_used: Option<u64>,
    /// Bytes free on the file system holding it.
    pub disk_free: Option<u64>,
    pub drops: Vec<ErrorCount>,
    pub quarantined: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    pub channel: ChannelId,
    pub target: Target,
    /// Oldest first, within the last hour.
    pub buckets: Vec<Bucket>,
}

/// The inputs of one page.
pub struct Inputs<'a> {
    pub now: DateTime<Utc>,
    pub started: DateTime<Utc>,
    pub families: &'a Families,
    pub recent: &'a RecentSnapshot,
    pub history: &'a History,
    pub configured: &'a ConfiguredView,
    /// `None` while the queue is still opening.
    pub queue: Option<&'a dyn ReadingStore>,
    pub open: OpenState,
    pub disk: (Option<u64>, Option<u64>),
}

pub fn collect(inputs: &Inputs<'_>) -> StatusPage {
    StatusPage {
        now: inputs.now,
        started: inputs.started,
        devices: devices(inputs),
        channels: channels(inputs),
        upstream: upstream(inputs),
        queue: queue(inputs),
        plots: inputs
            .recent
            .series
            .iter()
            .map(|((channel, target), buckets)| Plot {
                channel: *channel,
                target: *target,
                buckets: buckets.clone(),
            })
            .collect(),
        unplotted: inputs.recent.unplotted,
        downlink: downlink(inputs),
    }
}

fn downlink(inputs: &Inputs<'_>) -> DownlinkView {
    let f = inputs.families;
    let feeds = f
        .samples("tsgw_feed_subscribed")
        .iter()
        .map(|s| {
            let channel = s.label("channel").to_owned();
            let having = [("channel", channel.as_str())];
            FeedRow {
                subscribed: s.value > 0.0,
                entries: count(f.sum("tsgw_feed_entries_total", &having)),
                filled: count(f.sum("tsgw_feed_filled_entries_total", &having)),
                missed: count(f.sum("tsgw_feed_missed_entries_total", &having)),
                channel,
            }
        })
        .collect();
    let rules = f
        .samples("tsgw_downlink_received_total")
        .iter()
        .map(|s| {
            let rule = s.label("rule").to_owned();
            let having = [("rule", rule.as_str())];
            RuleRow {
                received: count(s.value),
                applied: count(f.sum("tsgw_downlink_applied_total", &having)),
                refused: error_counts(inputs, "tsgw_downlink_refused_total", &having, "reason", ""),
                failed: error_counts(inputs, "tsgw_downlink_failed_total", &having, "reason", ""),
                rule,
            }
        })
        .collect();
    DownlinkView { feeds, rules }
}

fn source_kind(label: &str) -> Option<SourceKind> {
    match label {
        "mqtt" => Some(SourceKind::Mqtt),
        "serial" => Some(SourceKind::Serial),
        "modbus" => Some(SourceKind::Modbus),
        _ => None,
    }
}

fn count(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

fn timestamp(value: Option<f64>) -> Option<DateTime<Utc>> {
    let secs = value.filter(|v| v.is_finite() && *v > 0.0)?;
    Utc.timestamp_millis_opt((secs * 1000.0) as i64).single()
}

/// Every non-zero counter of `family` with `having`, split by `by`, with
/// its last hour.
fn error_counts(
    inputs: &Inputs<'_>,
    family: &str,
    having: &[(&str, &str)],
    by: &str,
    prefix: &str,
) -> Vec<ErrorCount> {
    inputs
        .families
        .matching(family, having)
        .filter(|s| s.value > 0.0)
        .map(|s| ErrorCount {
            reason: format!("{prefix}{}", s.label(by)),
            last_hour: count(inputs.history.last_hour(
                inputs.families,
                family,
                &s.labels,
                inputs.now,
            )),
            total: count(s.value),
        })
        .collect()
}

fn devices(inputs: &Inputs<'_>) -> Vec<DeviceRow> {
    let mut keys: BTreeMap<(SourceKind, String), bool> = inputs
        .configured
        .devices
        .iter()
        .map(|k| (k.clone(), true))
        .collect();
    for origin in inputs.recent.devices.keys() {
        keys.entry((origin.source, origin.device.clone()))
            .or_insert(false);
    }
    for family in [
        "tsgw_readings_total",
        "tsgw_device_up",
        "tsgw_device_errors_total",
        "tsgw_parse_errors_total",
    ] {
        for sample in inputs.families.samples(family) {
            if let Some(source) = source_kind(sample.label("source")) {
                keys.entry((source, sample.label("device").to_owned()))
                    .or_insert(false);
            }
        }
    }
    keys.into_iter()
        .map(|((source, name), configured)| device_row(inputs, source, name, configured))
        .collect()
}

fn device_row(
    inputs: &Inputs<'_>,
    source: SourceKind,
    name: String,
    configured: bool,
) -> DeviceRow {
    let origin = tsgw_core::Origin::new(source, name.clone());
    let recent = inputs.recent.devices.get(&origin);
    // An account whose readings a rule made: they are stored under the
    // rule's name, and this is when the account itself was last heard.
    let published = match source {
        SourceKind::Mqtt => inputs.recent.publishers.get(&name),
        SourceKind::Serial | SourceKind::Modbus => None,
    };
    // `None` orders before any time: the later of the two that are known.
    let last_stored = recent
        .map(|r| r.last_stored)
        .max(published.map(|p| p.last_stored));
    let last_measured = recent
        .map(|r| r.last_measured)
        .max(published.map(|p| p.last_measured));
    let having = [("source", source.as_str()), ("device", name.as_str())];
    let state = match source {
        SourceKind::Serial | SourceKind::Modbus => {
            match inputs.families.value("tsgw_device_up", &having) {
                Some(up) if up > 0.0 => DeviceState::Up,
                Some(_) => DeviceState::Down,
                None => DeviceState::Unknown,
            }
        }
        SourceKind::Mqtt => match last_stored {
            Some(t) if (inputs.now - t).to_std().unwrap_or_default() < MQTT_RECEIVING => {
                DeviceState::Receiving
            }
            Some(_) => DeviceState::Quiet,
            None => DeviceState::Unknown,
        },
    };
    let readings = |result: &str| {
        count(inputs.families.sum(
            "tsgw_readings_total",
            &[having[0], having[1], ("result", result)],
        ))
    };
    let mut errors = error_counts(inputs, "tsgw_device_errors_total", &having, "kind", "");
    errors.extend(error_counts(
        inputs,
        "tsgw_parse_errors_total",
        &having,
        "reason",
        "",
    ));
    if source == SourceKind::Mqtt {
        errors.extend(error_counts(
            inputs,
            "tsgw_mqtt_denied_total",
            &[("user", name.as_str())],
            "reason",
            "refused: ",
        ));
    }
    DeviceRow {
        source,
        configured,
        state,
        last_stored,
        last_measured,
        via: published.map(|p| Via {
            rule: p.rule.clone(),
            channel: p.channel,
            readings: p.readings,
        }),
        values: recent
            .map(|r| {
                r.values
                    .iter()
                    .map(|((channel, target), value)| {
                        (format!("{channel} {target}"), value.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default(),
        accepted: readings("accepted"),
        rejected: readings("rejected"),
        errors,
        name,
    }
}

fn channels(inputs: &Inputs<'_>) -> Vec<ChannelRow> {
    let mut ids: BTreeSet<ChannelId> = inputs.configured.channels.clone();
    for family in [
        "tsgw_updates_sent_total",
        "tsgw_channel_last_sent_timestamp_seconds",
        "tsgw_channel_next_window_timestamp_seconds",
        "tsgw_backfill_remaining_readings",
    ] {
        for sample in inputs.families.samples(family) {
            if let Some(id) = sample
                .label("channel")
                .parse::<u64>()
                .ok()
                .and_then(|n| ChannelId::new(n).ok())
            {
                ids.insert(id);
            }
        }
    }
    if let Some(queue) = inputs.queue {
        ids.extend(queue.channels().unwrap_or_default());
    }
    ids.into_iter()
        .map(|channel| {
            let label = channel.to_string();
            let having = [("channel", label.as_str())];
            let gauge = |name: &str| inputs.families.value(name, &having);
            let oldest = inputs.queue.and_then(|q| {
                q.peek(channel, 1)
                    .ok()
                    .and_then(|queued| queued.first().map(|q| q.reading.measured_at))
            });
            ChannelRow {
                channel,
                last_sent: timestamp(gauge("tsgw_channel_last_sent_timestamp_seconds")),
                last_confirmed: timestamp(gauge("tsgw_channel_last_confirmed_timestamp_seconds")),
                next_window: timestamp(gauge("tsgw_channel_next_window_timestamp_seconds")),
                queued: inputs.queue.and_then(|q| q.len_of(channel).ok()),
                oldest_queued: oldest,
                backlog_readings: count(gauge("tsgw_backfill_remaining_readings").unwrap_or(0.0)),
                backlog_windows: count(gauge("tsgw_backfill_remaining_windows").unwrap_or(0.0)),
                sent: count(gauge("tsgw_updates_sent_total").unwrap_or(0.0)),
                confirmed: count(gauge("tsgw_updates_confirmed_total").unwrap_or(0.0)),
                dropped: error_counts(inputs, "tsgw_updates_dropped_total", &having, "reason", ""),
            }
        })
        .collect()
}

fn upstream(inputs: &Inputs<'_>) -> UpstreamView {
    let backfill = inputs
        .families
        .samples("tsgw_backfill_remaining_readings")
        .iter()
        .filter(|s| s.value > 0.0)
        .map(|s| {
            let channel = s.label("channel").to_owned();
            let readings = count(s.value);
            let rate = inputs.history.backfill_rate(&channel);
            BackfillRow {
                windows: count(
                    inputs
                        .families
                        .value("tsgw_backfill_remaining_windows", &[("channel", &channel)])
                        .unwrap_or(0.0),
                ),
                eta: rate
                    .filter(|r| *r > 0.0)
                    .map(|r| Duration::from_secs_f64(readings as f64 / r)),
                rate,
                readings,
                channel,
            }
        })
        .collect();
    UpstreamView {
        connections: inputs
            .families
            .samples("tsgw_upstream_connected")
            .iter()
            .map(|s| (s.label("connection").to_owned(), s.value > 0.0))
            .collect(),
        last_disconnect: inputs.history.last_disconnect(),
        disconnects: error_counts(inputs, "tsgw_upstream_disconnects_total", &[], "reason", ""),
        last_publish: timestamp(
            inputs
                .families
                .value("tsgw_upstream_last_publish_timestamp_seconds", &[]),
        ),
        backfill,
    }
}

fn queue(inputs: &Inputs<'_>) -> QueueView {
    let value = |name: &str| inputs.families.value(name, &[]).unwrap_or(0.0);
    let open = inputs.open;
    QueueView {
        open,
        readings: count(value("tsgw_queue_readings")),
        bytes: count(value("tsgw_queue_bytes")),
        max_bytes: inputs.configured.queue_max_bytes,
        oldest_age: (open.phase == OpenPhase::Open && value("tsgw_queue_readings") > 0.0)
            .then(|| Duration::from_secs_f64(value("tsgw_queue_oldest_age_seconds").max(0.0))),
        dir: inputs.configured.queue_dir.clone(),
        disk_used: inputs.disk.0,
        disk_free: inputs.disk.1,
        drops: error_counts(inputs, "tsgw_queue_dropped_total", &[], "reason", ""),
        quarantined: count(value("tsgw_queue_quarantined_total")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::status::recent::RecentReadings;
    use tsgw_core::{Field, Origin, Reading, Value};

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    fn page(
        families: &Families,
        recent: &RecentSnapshot,
        configured: &ConfiguredView,
    ) -> StatusPage {
        let history = History::default();
        collect(&Inputs {
            now: at(100),
            started: at(0),
            families,
            recent,
            history: &history,
            configured,
            queue: None,
            open: OpenState {
                phase: OpenPhase::Open,
                items: 0,
                elapsed: Duration::ZERO,
                phase_elapsed: Duration::ZERO,
                expected: None,
            },
            disk: (None, None),
        })
    }

    #[test]
    fn device_rows_join_config_metrics_and_recent_readings() {
        let configured = ConfiguredView {
            devices: [
                (SourceKind::Modbus, "plc".to_owned()),
                (SourceKind::Serial, "arduino".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..ConfiguredView::default()
        };
        let families = Families::from_samples([
            (
                "tsgw_device_up",
                &[("source", "modbus"), ("device", "plc")][..],
                0.0,
            ),
            (
                "tsgw_device_up",
                &[("source", "serial"), ("device", "arduino")][..],
                1.0,
            ),
            (
                "tsgw_device_errors_total",
                &[("source", "modbus"), ("device", "plc"), ("kind", "timeout")][..],
                4.0,
            ),
            (
                "tsgw_readings_total",
                &[
                    ("source", "mqtt"),
                    ("device", "esp"),
                    ("result", "accepted"),
                ][..],
                2.0,
            ),
        ]);
        let recent = RecentReadings::new();
        recent.observe_at(
            &[Reading {
                channel: ch(1001),
                target: Target::Field(Field::new(2).unwrap()),
                value: Value::Number(21.5),
                measured_at: at(90),
                origin: Origin::new(SourceKind::Mqtt, "esp"),
            }],
            at(95),
        );
        let p = page(&families, &recent.snapshot(at(100)), &configured);
        let names: Vec<(&str, DeviceState, bool)> = p
            .devices
            .iter()
            .map(|d| (d.name.as_str(), d.state, d.configured))
            .collect();
        assert_eq!(
            names,
            vec![
                ("esp", DeviceState::Receiving, false),
                ("arduino", DeviceState::Up, true),
                ("plc", DeviceState::Down, true),
            ]
        );
        let esp = &p.devices[0];
        assert_eq!(
            esp.values,
            vec![("1001 field2".to_owned(), "21.5".to_owned())]
        );
        assert_eq!(esp.accepted, 2);
        assert_eq!(esp.last_measured, Some(at(90)));
        assert_eq!(
            p.devices[2].errors,
            vec![ErrorCount {
                reason: "timeout".into(),
                last_hour: 4,
                total: 4
            }]
        );
        assert_eq!(p.plots.len(), 1);
    }

    #[test]
    fn an_account_publishing_through_a_rule_is_receiving() {
        let configured = ConfiguredView {
            devices: [
                (SourceKind::Mqtt, "greenhouse".to_owned()),
                (SourceKind::Mqtt, "esp".to_owned()),
                (SourceKind::Mqtt, "idle".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..ConfiguredView::default()
        };
        let recent = RecentReadings::new();
        recent.observe_published_at(
            &[Reading {
                channel: ch(1002),
                target: Target::Field(Field::new(1).unwrap()),
                value: Value::Number(21.5),
                measured_at: at(90),
                origin: Origin::new(SourceKind::Mqtt, "greenhouse"),
            }],
            &[(std::sync::Arc::from("esp"), 0..1)],
            at(95),
        );
        let p = page(&Families::default(), &recent.snapshot(at(100)), &configured);
        let row = |name: &str| p.devices.iter().find(|d| d.name == name).unwrap();
        let esp = row("esp");
        assert_eq!(esp.state, DeviceState::Receiving);
        assert_eq!(
            (esp.last_stored, esp.last_measured),
            (Some(at(95)), Some(at(90)))
        );
        assert_eq!(
            esp.via,
            Some(Via {
                rule: "greenhouse".into(),
                channel: ch(1002),
                readings: 1
            })
        );
        // The values stay on the rule's row.
        assert!(esp.values.is_empty());
        assert_eq!(row("greenhouse").values.len(), 1);
        assert_eq!(row("greenhouse").via, None);
        assert_eq!(row("idle").state, DeviceState::Unknown);
    }

    #[test]
    fn channel_rows_read_the_forwarder_gauges() {
        let configured = ConfiguredView {
            channels: [ch(7)].into_iter().collect(),
            ..ConfiguredView::default()
        };
        let families = Families::from_samples([
            (
                "tsgw_channel_last_sent_timestamp_seconds",
                &[("channel", "7")][..],
                1_700_000_050.0,
            ),
            (
                "tsgw_channel_next_window_timestamp_seconds",
                &[("channel", "7")][..],
                0.0,
            ),
            (
                "tsgw_backfill_remaining_readings",
                &[("channel", "8")][..],
                120.0,
            ),
            (
                "tsgw_backfill_remaining_windows",
                &[("channel", "8")][..],
                3.0,
            ),
            ("tsgw_updates_sent_total", &[("channel", "7")][..], 5.0),
        ]);
        let p = page(&families, &RecentSnapshot::default(), &configured);
        assert_eq!(p.channels.len(), 2);
        let seven = &p.channels[0];
        assert_eq!(seven.last_sent, Some(at(50)));
        assert_eq!(seven.next_window, None);
        assert_eq!(seven.sent, 5);
        assert_eq!(
            (
                p.channels[1].backlog_readings,
                p.channels[1].backlog_windows
            ),
            (120, 3)
        );
        assert_eq!(p.upstream.backfill.len(), 1);
        assert_eq!(p.upstream.backfill[0].eta, None, "no rate measured yet");
    }
}
