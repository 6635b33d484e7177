//! Turns the readings of one channel waiting in the store into one channel
//! update: the last value of each target wins, the update fits ThingSpeak's
//! limits, and the batch remembers exactly which readings it covers so they are
//! removed only once the update was written.
//!
//! Pure logic, no I/O. A later windowing policy (aggregates instead of last
//! value) replaces [`merge`] without touching the connection code.

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use thingspeak::limits::{MAX_MESSAGE_BYTES, MAX_VALUE_BYTES};
use thingspeak::{ChannelId, ChannelUpdate, Target};
use tsgw_core::{QueueKey, Queued};

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

/// One update ready to publish, and what it covers.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub channel: ChannelId,
    pub update: ChannelUpdate,
    /// Readings the update covers (including ones superseded by a later value
    /// of the same target): remove these once the update is written.
    pub covered: Vec<QueueKey>,
    /// Readings to drop now: they can never be sent.
    pub rejected: Vec<Rejected>,
}

impl Batch {
    /// True when there is nothing to publish (maybe only rejects to drop).
    pub fn is_empty(&self) -> bool {
        self.update.is_empty()
    }
}

/// Merges `queued` (oldest first, all of `channel`) into one update.
///
/// - The last reading (in queue order) of each target gives its value.
/// - A value over 255 bytes is rejected: ThingSpeak would refuse the whole update.
/// - Targets are added in order (field1..8, status, lat, long, elevation) while
///   the payload stays within 3000 bytes; readings of targets that do not fit
///   stay in the store for the next update.
/// - `created_at` is the newest measurement time of the included readings, in
///   whole seconds, no later than `now`, and strictly after `last_created_at`
///   (ThingSpeak rejects a repeated `created_at` within a channel; a resend of
///   the same readings after a lost connection keeps its `created_at`, so a
///   duplicate that did arrive is rejected rather than stored twice).
pub fn merge(
    channel: ChannelId,
    queued: &[Queued],
    last_created_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Batch {
    struct Slot {
        value: String,
        keys: Vec<QueueKey>,
        newest: DateTime<Utc>,
    }
    let mut slots: BTreeMap<Target, Slot> = BTreeMap::new();
    let mut rejected = Vec::new();
    for q in queued.iter().filter(|q| q.reading.channel == channel) {
        let r = &q.reading;
        let value = r.value.to_string();
        if value.len() > MAX_VALUE_BYTES {
            rejected.push(Rejected {
                key: q.key,
                target: r.target,
                reason: "value_too_long",
                detail: format!(
                    "value of {} is {} bytes, ThingSpeak allows {MAX_VALUE_BYTES}",
                    r.target,
                    value.len()
                ),
            });
            continue;
        }
        let slot = slots.entry(r.target).or_insert_with(|| Slot {
            value: String::new(),
            keys: Vec::new(),
            newest: r.measured_at,
        });
        slot.value = value;
        slot.keys.push(q.key);
        slot.newest = slot.newest.max(r.measured_at);
    }

    let mut update = ChannelUpdate::new();
    let mut covered = Vec::new();
    let mut newest: Option<DateTime<Utc>> = None;
    // The timestamp parameter is added last; reserve its size up front.
    let created_at_len = "&created_at=2026-01-02T03%3A04%3A05Z".len();
    for (target, slot) in slots {
        update.set(target, slot.value.clone());
        if update.encode().len() + created_at_len > MAX_MESSAGE_BYTES {
            update.values.remove(&target);
            continue;
        }
        covered.extend(slot.keys);
        newest = Some(newest.map_or(slot.newest, |n| n.max(slot.newest)));
    }
    covered.sort();

    update.created_at = newest.map(|t| created_at(t, last_created_at, now));
    Batch {
        channel,
        update,
        covered,
        rejected,
    }
}

fn created_at(
    newest: DateTime<Utc>,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let second = TimeDelta::seconds(1);
    let whole = |t: DateTime<Utc>| t.duration_trunc(second).unwrap_or(t);
    let mut t = whole(newest.min(now));
    if let Some(last) = last {
        if t <= last {
            t = whole(last) + second;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use thingspeak::Field;
    use tsgw_core::{Origin, Reading, SourceKind, Value};

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    fn field(n: u8) -> Target {
        Target::Field(Field::new(n).unwrap())
    }

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
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

    fn key(seq: u64) -> QueueKey {
        QueueKey {
            channel: ch(1),
            seq,
        }
    }

    #[test]
    fn last_value_per_target_wins_and_all_are_covered() {
        let readings = [
            q(1, field(1), Value::Number(20.0), t(0)),
            q(2, field(2), Value::Number(40.0), t(1)),
            q(3, field(1), Value::Number(21.5), t(2)),
            q(4, Target::Status, Value::Text("ok".into()), t(3)),
        ];
        let b = merge(ch(1), &readings, None, t(100));
        assert_eq!(b.update.get(field(1)), Some("21.5"));
        assert_eq!(b.update.get(field(2)), Some("40"));
        assert_eq!(b.update.get(Target::Status), Some("ok"));
        assert_eq!(b.covered, vec![key(1), key(2), key(3), key(4)]);
        assert_eq!(b.update.created_at, Some(t(3)));
        assert!(b.rejected.is_empty());
        assert_eq!(
            b.update.encode(),
            "field1=21.5&field2=40&status=ok&created_at=2027-01-15T08%3A00%3A03Z"
        );
    }

    #[test]
    fn empty_input_gives_an_empty_batch() {
        let b = merge(ch(1), &[], None, t(0));
        assert!(b.is_empty());
        assert!(b.covered.is_empty());
        assert_eq!(b.update.created_at, None);
    }

    #[test]
    fn overlong_values_are_rejected_not_sent() {
        let readings = [
            q(1, field(1), Value::Text("x".repeat(256)), t(0)),
            q(2, field(2), Value::Number(1.0), t(0)),
        ];
        let b = merge(ch(1), &readings, None, t(10));
        assert_eq!(b.update.get(field(1)), None);
        assert_eq!(b.covered, vec![key(2)]);
        assert_eq!(b.rejected.len(), 1);
        assert_eq!(b.rejected[0].key, key(1));
        assert_eq!(b.rejected[0].reason, "value_too_long");
    }

    #[test]
    fn targets_that_do_not_fit_stay_queued() {
        // Values that triple in size when URL-encoded: 12 of them cannot fit in 3000 bytes.
        let big = "&".repeat(255);
        let readings: Vec<Queued> = (1..=8)
            .map(|n| q(u64::from(n), field(n), Value::Text(big.clone()), t(0)))
            .collect();
        let b = merge(ch(1), &readings, None, t(10));
        assert!(b.update.encode().len() <= MAX_MESSAGE_BYTES);
        assert!(b.update.validate().is_ok());
        let included = b.update.values.len();
        assert!((1..8).contains(&included), "{included}");
        assert_eq!(b.covered.len(), included);
        assert!(!b.covered.contains(&key(8)));
    }

    #[test]
    fn created_at_is_whole_seconds_not_future_and_increasing() {
        let at = t(5) + TimeDelta::milliseconds(700);
        let readings = [q(1, field(1), Value::Number(1.0), at)];
        assert_eq!(
            merge(ch(1), &readings, None, t(9)).update.created_at,
            Some(t(5))
        );
        // A device clock ahead of ours is capped at our now.
        assert_eq!(
            merge(ch(1), &readings, None, t(2)).update.created_at,
            Some(t(2))
        );
        // Never repeats or goes back behind the previous update's timestamp.
        assert_eq!(
            merge(ch(1), &readings, Some(t(5)), t(9)).update.created_at,
            Some(t(6))
        );
        assert_eq!(
            merge(ch(1), &readings, Some(t(7)), t(9)).update.created_at,
            Some(t(8))
        );
    }

    #[test]
    fn readings_of_other_channels_are_ignored() {
        let mut other = q(9, field(1), Value::Number(5.0), t(0));
        other.reading.channel = ch(2);
        let b = merge(ch(1), &[other], None, t(0));
        assert!(b.is_empty());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        fn target() -> impl Strategy<Value = Target> {
            prop_oneof![
                (1u8..=8).prop_map(|n| Target::Field(Field::new(n).unwrap())),
                Just(Target::Status),
                Just(Target::Latitude),
                Just(Target::Longitude),
                Just(Target::Elevation),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<f64>().prop_map(Value::Number),
                // Up to 300 characters of any kind, so some exceed 255 bytes
                // and some triple in size when URL-encoded.
                ".{0,300}".prop_map(Value::Text),
            ]
        }

        proptest! {
            #[test]
            fn every_reading_is_covered_rejected_or_left_and_limits_hold(
                input in proptest::collection::vec((target(), value(), 0i64..100), 0..40),
                last in proptest::option::of(0i64..200),
            ) {
                let readings: Vec<Queued> = input
                    .iter()
                    .enumerate()
                    .map(|(i, (tg, v, s))| q(i as u64, *tg, v.clone(), t(*s)))
                    .collect();
                let b = merge(ch(1), &readings, last.map(t), t(150));

                let covered: BTreeSet<QueueKey> = b.covered.iter().copied().collect();
                let rejected: BTreeSet<QueueKey> = b.rejected.iter().map(|r| r.key).collect();
                prop_assert_eq!(covered.len(), b.covered.len(), "no key twice");
                prop_assert!(covered.is_disjoint(&rejected));

                if !b.is_empty() {
                    prop_assert!(b.update.validate().is_ok(), "{:?}", b.update.validate());
                    prop_assert!(b.update.encode().len() <= MAX_MESSAGE_BYTES);
                    let at = b.update.created_at.unwrap();
                    // Not after now, unless only a step past the previous update
                    // keeps the timestamps strictly increasing.
                    match last {
                        Some(l) => {
                            prop_assert!(at > t(l));
                            prop_assert!(at <= t(150).max(t(l + 1)));
                        }
                        None => prop_assert!(at <= t(150)),
                    }
                }
                for qd in &readings {
                    let text = qd.reading.value.to_string();
                    if text.len() > MAX_VALUE_BYTES {
                        prop_assert!(rejected.contains(&qd.key));
                    } else if b.update.values.contains_key(&qd.reading.target) {
                        // Every sendable reading of an included target is covered...
                        prop_assert!(covered.contains(&qd.key));
                    } else {
                        // ...and readings of targets that did not fit stay queued.
                        prop_assert!(!covered.contains(&qd.key) && !rejected.contains(&qd.key));
                    }
                }
                // The value sent is the last sendable one of its target.
                for (target, sent) in &b.update.values {
                    let last_value = readings
                        .iter()
                        .filter(|qd| qd.reading.target == *target)
                        .map(|qd| qd.reading.value.to_string())
                        .rfind(|v| v.len() <= MAX_VALUE_BYTES);
                    prop_assert_eq!(Some(sent), last_value.as_ref());
                }
            }
        }
    }
}
