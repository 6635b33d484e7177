//! Turns the readings of one channel waiting in the store into channel
//! updates: one per rate-limit window, each target aggregated by its policy.
//!
//! - Window `k` of a channel with window length `len` covers measurement
//!   times `[k*len, (k+1)*len)` (Unix time). Its update carries
//!   `created_at` = the window's start in whole seconds; windows are at least
//!   1 s long so two windows never share a `created_at`.
//! - A reading measured in the future (device clock ahead) counts as measured now.
//! - A reading whose window was already sent (it came late) joins the next
//!   window that was not: ThingSpeak would reject a second update with the
//!   same `created_at`.
//! - A window is sent only once closed (its end plus a short grace has
//!   passed), so its aggregate is final.
//!
//! Pure logic, no I/O: the forwarder decides which windows go when and how.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thingspeak::limits::{MAX_MESSAGE_BYTES, MAX_VALUE_BYTES};
use thingspeak::{ChannelId, ChannelUpdate, Target};
use tsgw_core::{QueueKey, Queued, Value};

/// Time a window stays open after its end, for readings still on their way
/// through the queue.
pub const WINDOW_GRACE: Duration = Duration::from_millis(250);

/// Shortest window: `created_at` has seconds resolution.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);

/// How the readings of one target within a window become the one value sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// The last reading (in queue order).
    #[default]
    Last,
    /// The first reading.
    First,
    /// Arithmetic mean of the numeric readings.
    Mean,
    Min,
    Max,
    Sum,
    /// How many readings the window holds (numeric or not).
    Count,
}

impl Aggregate {
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Last => "last",
            Aggregate::First => "first",
            Aggregate::Mean => "mean",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Sum => "sum",
            Aggregate::Count => "count",
        }
    }

    /// The value sent for `values` (non-empty, in queue order). Numeric
    /// policies use the numeric readings (numbers, or text that parses as a
    /// finite number); a window with none falls back to the last value.
    pub fn apply(self, values: &[&Value]) -> Option<String> {
        let last = values.last().map(|v| v.to_string());
        let numbers: Vec<f64> = values
            .iter()
            .filter_map(|v| match v {
                Value::Number(n) => Some(*n),
                Value::Text(t) => t.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
            })
            .collect();
        let numeric = |f: fn(&[f64]) -> f64| {
            if numbers.is_empty() {
                last.clone()
            } else {
                Some(Value::Number(f(&numbers)).to_string())
            }
        };
        match self {
            Aggregate::Last => last,
            Aggregate::First => values.first().map(|v| v.to_string()),
            Aggregate::Count => Some(values.len().to_string()),
            Aggregate::Mean => numeric(|n| n.iter().sum::<f64>() / n.len() as f64),
            Aggregate::Min => numeric(|n| n.iter().copied().fold(f64::INFINITY, f64::min)),
            Aggregate::Max => numeric(|n| n.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
            Aggregate::Sum => numeric(|n| n.iter().sum()),
        }
    }
}

/// The aggregation policy of each target of one channel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    pub by_target: BTreeMap<Target, Aggregate>,
}

impl Policies {
    pub fn get(&self, target: Target) -> Aggregate {
        self.by_target.get(&target).copied().unwrap_or_default()
    }
}

/// A reading that can never be sent, so it is dropped (and counted) instead of
/// blocking its channel forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub key: QueueKey,
    pub target: Target,
    /// Short metric label.
    pub reason: &'static str,
    /// For the log line.
    pub detail: String,
}

/// One update ready to send, and what it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub channel: ChannelId,
    /// Always has `created_at` set (the window's start).
    pub update: ChannelUpdate,
    /// Readings the update covers: remove these once it is delivered.
    pub covered: Vec<QueueKey>,
}

impl Batch {
    /// True when there is nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.update.is_empty()
    }

    pub fn created_at(&self) -> Option<DateTime<Utc>> {
        self.update.created_at
    }
}

/// The readings of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The window's `created_at` (its start, whole seconds).
    pub created_at: DateTime<Utc>,
    /// When the window may be sent (its end plus [`WINDOW_GRACE`]).
    pub closes_at: DateTime<Utc>,
    /// Readings in queue order.
    pub readings: Vec<Queued>,
}

impl Group {
    pub fn is_closed(&self, now: DateTime<Utc>) -> bool {
        self.closes_at <= now
    }
}

/// The effective window length for a channel interval.
pub fn window_len(interval: Duration) -> Duration {
    interval.max(MIN_WINDOW)
}

/// Groups `queued` (oldest first, readings of other channels ignored) into
/// windows, oldest first. Readings of unsendable size are returned separately.
pub fn group(
    channel: ChannelId,
    queued: &[Queued],
    len: Duration,
    used: &BTreeSet<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (Vec<Group>, Vec<Rejected>) {
    let len_ms = i64::try_from(window_len(len).as_millis()).unwrap_or(i64::MAX / 4);
    let grace_ms = i64::try_from(WINDOW_GRACE.as_millis()).unwrap_or(0);
    let start_of = |k: i64| k.saturating_mul(len_ms);
    let created_at_of = |k: i64| {
        DateTime::from_timestamp(start_of(k).div_euclid(1000), 0).unwrap_or(DateTime::UNIX_EPOCH)
    };
    let now_ms = now.timestamp_millis();
    let mut windows: BTreeMap<i64, Vec<Queued>> = BTreeMap::new();
    let mut rejected = Vec::new();
    for q in queued.iter().filter(|q| q.reading.channel == channel) {
        let r = &q.reading;
        // Only text can be too long (a number is at most ~24 characters);
        // formatting every number here cost a quarter of the gateway's CPU
        // while a backlog waited (perf, bench README).
        let len = match &r.value {
            Value::Text(text) => text.len(),
            Value::Number(_) => 0,
        };
        if len > MAX_VALUE_BYTES {
            rejected.push(Rejected {
                key: q.key,
                target: r.target,
                reason: "value_too_long",
                detail: format!(
                    "value of {} is {len} bytes, ThingSpeak allows {MAX_VALUE_BYTES}",
                    r.target
                ),
            });
            continue;
        }
        let t = r.measured_at.timestamp_millis().min(now_ms);
        let mut k = t.div_euclid(len_ms);
        // Late for a window already sent: the next free one.
        while used.contains(&created_at_of(k)) {
            k += 1;
        }
        windows.entry(k).or_default().push(q.clone());
    }
    let groups = windows
        .into_iter()
        .map(|(k, readings)| Group {
            created_at: created_at_of(k),
            closes_at: DateTime::from_timestamp_millis(
                start_of(k).saturating_add(len_ms).saturating_add(grace_ms),
            )
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
            readings,
        })
        .collect();
    (groups, rejected)
}

/// One update from the readings of one or more windows, stamped `created_at`.
///
/// Targets are added in order (field1..8, status, lat, long, elevation) while
/// the payload stays within ThingSpeak's 3000 bytes; readings of targets that
/// do not fit are not covered and stay in the store for a later window.
pub fn aggregate(
    channel: ChannelId,
    created_at: DateTime<Utc>,
    readings: &[&Queued],
    policies: &Policies,
) -> Batch {
    let mut by_target: BTreeMap<Target, Vec<&Queued>> = BTreeMap::new();
    for q in readings {
        by_target.entry(q.reading.target).or_default().push(q);
    }
    let mut update = ChannelUpdate::new();
    let mut covered = Vec::new();
    // The timestamp parameter is added last; reserve its size up front.
    let created_at_len = "&created_at=2026-01-02T03%3A04%3A05Z".len();
    for (target, qs) in by_target {
        let values: Vec<&Value> = qs.iter().map(|q| &q.reading.value).collect();
        let Some(value) = policies.get(target).apply(&values) else {
            continue;
        };
        if value.len() > MAX_VALUE_BYTES {
            // Only a text "last"/"first" can be this long, and those were
            // rejected already; an aggregate never is. Leave them queued.
            continue;
        }
        update.set(target, value);
        if update.encode().len() + created_at_len > MAX_MESSAGE_BYTES {
            update.values.remove(&target);
            continue;
        }
        covered.extend(qs.iter().map(|q| q.key));
    }
    covered.sort();
    update.created_at = Some(created_at);
    Batch {
        channel,
        update,
        covered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use thingspeak::Field;
    use tsgw_core::{Origin, Reading, SourceKind};

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    fn field(n: u8) -> Target {
        Target::Field(Field::new(n).unwrap())
    }

    /// 1_800_000_000 is a multiple of 2, 5 and 10 s.
    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    fn q(seq: u64, target: Target, value: Value, at: DateTime<Utc>) -> Queued {
        Queued {
            key: QueueKey {
                channel: ch(1),
                seq,
            },
            reading: Reading {
                channel: ch(1),
                target,
                value,
                measured_at: at,
                origin: Origin::new(SourceKind::Mqtt, "dev"),
            },
        }
    }

    fn num(v: f64) -> Value {
        Value::Number(v)
    }

    #[test]
    fn policies_aggregate_as_named() {
        let vals = [num(3.0), num(1.0), Value::Text("2".into()), num(6.0)];
        let v: Vec<&Value> = vals.iter().collect();
        let got = |a: Aggregate| a.apply(&v).unwrap();
        assert_eq!(got(Aggregate::Last), "6");
        assert_eq!(got(Aggregate::First), "3");
        assert_eq!(got(Aggregate::Mean), "3");
        assert_eq!(got(Aggregate::Min), "1");
        assert_eq!(got(Aggregate::Max), "6");
        assert_eq!(got(Aggregate::Sum), "12");
        assert_eq!(got(Aggregate::Count), "4");
        // Text that is not a number: numeric policies fall back to the last value.
        let text = [Value::Text("open".into()), Value::Text("closed".into())];
        let tv: Vec<&Value> = text.iter().collect();
        assert_eq!(Aggregate::Mean.apply(&tv).unwrap(), "closed");
        assert_eq!(Aggregate::Count.apply(&tv).unwrap(), "2");
        assert_eq!(Aggregate::Last.apply(&[]), None);
    }

    #[test]
    fn policy_names_parse_from_config() {
        #[derive(Deserialize)]
        struct W {
            a: BTreeMap<String, Aggregate>,
        }
        let w: W = toml::from_str(r#"a = { field1 = "mean", field2 = "count" }"#).unwrap();
        assert_eq!(w.a["field1"], Aggregate::Mean);
        assert_eq!(w.a["field2"].as_str(), "count");
        assert!(toml::from_str::<W>(r#"a = { field1 = "median" }"#).is_err());
    }

    #[test]
    fn readings_are_grouped_by_measurement_window() {
        let readings = [
            q(1, field(1), num(1.0), t(100)),
            q(2, field(1), num(2.0), t(1900)),
            q(3, field(1), num(3.0), t(2000)),
            q(4, field(2), num(4.0), t(4500)),
        ];
        let (groups, rejected) = group(
            ch(1),
            &readings,
            Duration::from_secs(2),
            &BTreeSet::new(),
            t(5000),
        );
        assert!(rejected.is_empty());
        let starts: Vec<_> = groups.iter().map(|g| g.created_at).collect();
        assert_eq!(starts, vec![t(0), t(2000), t(4000)]);
        assert_eq!(groups[0].readings.len(), 2);
        assert!(groups[0].is_closed(t(5000)));
        assert!(groups[1].is_closed(t(5000)));
        assert!(!groups[2].is_closed(t(5000)), "the current window is open");
        assert!(!groups[1].is_closed(t(4100)), "grace after the end");
    }

    #[test]
    fn late_and_future_readings_move_to_a_free_window() {
        let readings = [
            q(1, field(1), num(1.0), t(500)),
            q(2, field(1), num(2.0), t(60_000)),
        ];
        let used = BTreeSet::from([t(0), t(1000)]);
        let (groups, _) = group(ch(1), &readings, Duration::from_secs(1), &used, t(3000));
        let starts: Vec<_> = groups.iter().map(|g| g.created_at).collect();
        // The late reading skips the two sent windows; the future one is "now".
        assert_eq!(starts, vec![t(2000), t(3000)]);
    }

    #[test]
    fn windows_shorter_than_a_second_are_a_second() {
        let readings = [
            q(1, field(1), num(1.0), t(100)),
            q(2, field(1), num(2.0), t(900)),
        ];
        let (groups, _) = group(
            ch(1),
            &readings,
            Duration::from_millis(200),
            &BTreeSet::new(),
            t(5000),
        );
        assert_eq!(groups.len(), 1);
        assert_eq!(window_len(Duration::from_millis(200)), MIN_WINDOW);
    }

    #[test]
    fn fractional_windows_keep_distinct_whole_second_timestamps() {
        let readings: Vec<Queued> = (0..20)
            .map(|i| q(i, field(1), num(i as f64), t(i as i64 * 700)))
            .collect();
        let (groups, _) = group(
            ch(1),
            &readings,
            Duration::from_millis(1500),
            &BTreeSet::new(),
            t(60_000),
        );
        let stamps: BTreeSet<_> = groups.iter().map(|g| g.created_at).collect();
        assert_eq!(stamps.len(), groups.len());
        for g in &groups {
            assert_eq!(g.created_at.timestamp_subsec_millis(), 0);
        }
    }

    #[test]
    fn aggregate_applies_per_target_policy_and_covers_all() {
        let readings = [
            q(1, field(1), num(20.0), t(0)),
            q(2, field(2), num(40.0), t(100)),
            q(3, field(1), num(21.0), t(200)),
            q(4, Target::Status, Value::Text("ok".into()), t(300)),
        ];
        let refs: Vec<&Queued> = readings.iter().collect();
        let policies = Policies {
            by_target: BTreeMap::from([(field(1), Aggregate::Mean)]),
        };
        let b = aggregate(ch(1), t(0), &refs, &policies);
        assert_eq!(b.update.get(field(1)), Some("20.5"));
        assert_eq!(b.update.get(field(2)), Some("40"));
        assert_eq!(b.update.get(Target::Status), Some("ok"));
        assert_eq!(b.covered.len(), 4);
        assert_eq!(b.created_at(), Some(t(0)));
        assert_eq!(
            b.update.encode(),
            "field1=20.5&field2=40&status=ok&created_at=2027-01-15T08%3A00%3A00Z"
        );
    }

    #[test]
    fn overlong_values_are_rejected_not_sent() {
        let readings = [
            q(1, field(1), Value::Text("x".repeat(256)), t(0)),
            q(2, field(2), num(1.0), t(0)),
        ];
        let (groups, rejected) = group(
            ch(1),
            &readings,
            Duration::from_secs(1),
            &BTreeSet::new(),
            t(10_000),
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].reason, "value_too_long");
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].readings.len(), 1);
    }

    #[test]
    fn targets_that_do_not_fit_stay_queued() {
        // Values that triple in size when URL-encoded: 8 of them cannot fit in 3000 bytes.
        let big = "&".repeat(255);
        let readings: Vec<Queued> = (1..=8)
            .map(|n| q(u64::from(n), field(n), Value::Text(big.clone()), t(0)))
            .collect();
        let refs: Vec<&Queued> = readings.iter().collect();
        let b = aggregate(ch(1), t(0), &refs, &Policies::default());
        assert!(b.update.encode().len() <= MAX_MESSAGE_BYTES);
        assert!(b.update.validate().is_ok());
        let included = b.update.values.len();
        assert!((1..8).contains(&included), "{included}");
        assert_eq!(b.covered.len(), included);
    }

    #[test]
    fn readings_of_other_channels_are_ignored() {
        let mut other = q(9, field(1), num(5.0), t(0));
        other.reading.channel = ch(2);
        let (groups, _) = group(
            ch(1),
            &[other],
            Duration::from_secs(1),
            &BTreeSet::new(),
            t(5000),
        );
        assert!(groups.is_empty());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_reading_lands_in_exactly_one_window_with_a_fresh_timestamp(
                input in proptest::collection::vec((1u8..=8, -1000.0f64..1000.0, 0i64..20_000), 0..60),
                len_ms in 1000u64..5000,
                used in proptest::collection::btree_set(0i64..20, 0..5),
            ) {
                let readings: Vec<Queued> = input
                    .iter()
                    .enumerate()
                    .map(|(i, (f, v, at))| q(i as u64, field(*f), num(*v), t(*at)))
                    .collect();
                let used: BTreeSet<DateTime<Utc>> =
                    used.into_iter().map(|s| t(s * 1000)).collect();
                let now = t(15_000);
                let (groups, rejected) =
                    group(ch(1), &readings, Duration::from_millis(len_ms), &used, now);
                prop_assert!(rejected.is_empty());
                let total: usize = groups.iter().map(|g| g.readings.len()).sum();
                prop_assert_eq!(total, readings.len());
                let mut last = None;
                for g in &groups {
                    prop_assert!(!used.contains(&g.created_at));
                    prop_assert!(last.is_none_or(|l| l < g.created_at), "strictly increasing");
                    last = Some(g.created_at);
                    let refs: Vec<&Queued> = g.readings.iter().collect();
                    let b = aggregate(ch(1), g.created_at, &refs, &Policies::default());
                    prop_assert_eq!(b.covered.len(), g.readings.len());
                    prop_assert!(b.update.validate().is_ok());
                }
            }
        }
    }
}
