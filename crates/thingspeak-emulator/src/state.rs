//! Channels and their entries: the rules ThingSpeak applies to a write.
//!
//! Pure logic, no I/O and no clock of its own (callers pass `now`), so every
//! rule is unit-tested here: the per-channel rate limit, unique `created_at`,
//! incrementing entry ids, bulk-call spacing and size.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use thingspeak::{format_timestamp, ChannelId, ChannelUpdate, EntryJson, Field, Target};

use crate::config::ChannelSpec;

/// How an entry reached the emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOrigin {
    Mqtt,
    /// `POST /update.json` (or `GET /update`).
    UpdateApi,
    /// `POST /channels/<id>/bulk_update.json`; never relayed to subscribers.
    Bulk,
}

/// One accepted channel entry: what subscribers get (`data`) plus how it came in.
/// Serializes as the subscriber JSON with an extra `origin` member.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    #[serde(flatten)]
    pub data: EntryJson,
    pub origin: WriteOrigin,
}

impl Entry {
    pub fn channel(&self) -> ChannelId {
        self.data.channel_id
    }

    pub fn entry_id(&self) -> u64 {
        self.data.entry_id
    }

    pub fn created_at(&self) -> DateTime<Utc> {
        self.data.created_at
    }

    pub fn get(&self, target: Target) -> Option<&str> {
        self.data.get(target)
    }

    /// Field `n` (1..=8), if set.
    pub fn field(&self, n: u8) -> Option<&str> {
        Field::new(n)
            .ok()
            .and_then(|f| self.data.get(Target::Field(f)))
    }
}

/// Why a single update was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteRejected {
    #[error("channel {0} does not exist")]
    UnknownChannel(ChannelId),
    #[error("channel {channel}: update within {interval:?} of the previous one")]
    RateLimited {
        channel: ChannelId,
        interval: Duration,
    },
    #[error("channel {channel}: an entry with created_at {created_at} already exists")]
    DuplicateTimestamp {
        channel: ChannelId,
        created_at: String,
    },
}

/// One element of a bulk call: absolute or relative time plus values.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkUpdate {
    pub time: BulkTime,
    pub values: BTreeMap<Target, String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BulkTime {
    At(DateTime<Utc>),
    /// Seconds after the previous update of the call (the first: after the
    /// channel's last entry, or after the time of the call on an empty channel).
    Delta(f64),
}

/// Why a whole bulk call was refused (the HTTP status follows from it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BulkRejected {
    #[error("channel {0} does not exist")]
    UnknownChannel(ChannelId),
    #[error("channel {channel}: bulk call within {interval:?} of the previous one")]
    TooFrequent {
        channel: ChannelId,
        interval: Duration,
    },
    #[error("{count} updates in one call; at most {max} allowed")]
    TooMany { count: usize, max: usize },
    #[error("a bulk call needs at least one update")]
    Empty,
    #[error("update {index}: delta_t must be a finite number of seconds, and 0 only for the first update")]
    BadDelta { index: usize },
}

/// What a successful bulk call stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkOutcome {
    pub stored: usize,
    /// Updates skipped because their created_at already existed.
    pub duplicates: usize,
}

/// Limits that are the emulator's settings rather than a channel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub default_interval: Duration,
    pub bulk_interval: Duration,
    pub max_bulk_updates: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_interval: Duration::from_secs(15),
            bulk_interval: thingspeak::limits::BULK_MIN_INTERVAL,
            max_bulk_updates: thingspeak::License::Free.bulk_max_updates(),
        }
    }
}

#[derive(Debug)]
struct ChannelState {
    spec: ChannelSpec,
    entries: Vec<Entry>,
    timestamps: HashSet<DateTime<Utc>>,
    last_write: Option<Instant>,
    last_bulk: Option<Instant>,
}

impl ChannelState {
    fn push(
        &mut self,
        created_at: DateTime<Utc>,
        values: &BTreeMap<Target, String>,
        origin: WriteOrigin,
    ) -> Entry {
        let entry_id = self.entries.last().map_or(1, |e| e.entry_id() + 1);
        let mut data = EntryJson::new(self.spec.id, entry_id, created_at);
        for (target, value) in values {
            data.set(*target, Some(value.clone()));
        }
        let entry = Entry { data, origin };
        self.timestamps.insert(created_at);
        self.entries.push(entry.clone());
        entry
    }
}

/// All channels and their entries.
#[derive(Debug)]
pub struct Store {
    channels: BTreeMap<ChannelId, ChannelState>,
    limits: Limits,
}

impl Store {
    pub fn new(channels: impl IntoIterator<Item = ChannelSpec>, limits: Limits) -> Self {
        let channels = channels
            .into_iter()
            .map(|spec| {
                (
                    spec.id,
                    ChannelState {
                        spec,
                        entries: Vec::new(),
                        timestamps: HashSet::new(),
                        last_write: None,
                        last_bulk: None,
                    },
                )
            })
            .collect();
        Self { channels, limits }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn channel(&self, id: ChannelId) -> Option<&ChannelSpec> {
        self.channels.get(&id).map(|c| &c.spec)
    }

    pub fn channel_ids(&self) -> Vec<ChannelId> {
        self.channels.keys().copied().collect()
    }

    pub fn entries(&self, id: ChannelId) -> Option<&[Entry]> {
        self.channels.get(&id).map(|c| c.entries.as_slice())
    }

    /// The entry with the highest id (what a new subscriber gets first).
    pub fn last_entry(&self, id: ChannelId) -> Option<&Entry> {
        self.channels.get(&id).and_then(|c| c.entries.last())
    }

    /// The minimum spacing of accepted updates on this channel.
    pub fn interval(&self, id: ChannelId) -> Option<Duration> {
        self.channels
            .get(&id)
            .map(|c| c.spec.interval.unwrap_or(self.limits.default_interval))
    }

    /// Applies one update (MQTT or `/update.json`): rate limit first (a
    /// dropped update does not move the window), then unique created_at.
    pub fn write(
        &mut self,
        id: ChannelId,
        update: &ChannelUpdate,
        origin: WriteOrigin,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Result<Entry, WriteRejected> {
        let interval = self.interval(id).ok_or(WriteRejected::UnknownChannel(id))?;
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(WriteRejected::UnknownChannel(id))?;
        if let Some(last) = ch.last_write {
            if now.saturating_duration_since(last) < interval {
                return Err(WriteRejected::RateLimited {
                    channel: id,
                    interval,
                });
            }
        }
        let created_at = update.created_at.unwrap_or(wall);
        if ch.timestamps.contains(&created_at) {
            return Err(WriteRejected::DuplicateTimestamp {
                channel: id,
                created_at: format_timestamp(&created_at),
            });
        }
        ch.last_write = Some(now);
        Ok(ch.push(created_at, &update.values, origin))
    }

    /// Applies a bulk call. Updates whose created_at exists are skipped and
    /// counted; a call that is refused as a whole stores nothing.
    pub fn bulk(
        &mut self,
        id: ChannelId,
        updates: &[BulkUpdate],
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Result<BulkOutcome, BulkRejected> {
        let limits = self.limits;
        let ch = self
            .channels
            .get_mut(&id)
            .ok_or(BulkRejected::UnknownChannel(id))?;
        if updates.is_empty() {
            return Err(BulkRejected::Empty);
        }
        if updates.len() > limits.max_bulk_updates {
            return Err(BulkRejected::TooMany {
                count: updates.len(),
                max: limits.max_bulk_updates,
            });
        }
        if let Some(last) = ch.last_bulk {
            if now.saturating_duration_since(last) < limits.bulk_interval {
                return Err(BulkRejected::TooFrequent {
                    channel: id,
                    interval: limits.bulk_interval,
                });
            }
        }
        let mut previous = ch.entries.last().map_or(wall, Entry::created_at);
        let mut resolved = Vec::with_capacity(updates.len());
        for (index, u) in updates.iter().enumerate() {
            let at = match u.time {
                BulkTime::At(t) => t,
                BulkTime::Delta(d) => {
                    let valid = (0.0..1e12).contains(&d) && (d > 0.0 || index == 0);
                    if !valid {
                        return Err(BulkRejected::BadDelta { index });
                    }
                    // Bounded above, so the cast cannot overflow.
                    let millis = (d * 1000.0).round() as i64;
                    previous
                        .checked_add_signed(chrono::TimeDelta::milliseconds(millis))
                        .ok_or(BulkRejected::BadDelta { index })?
                }
            };
            previous = at;
            resolved.push(at);
        }
        ch.last_bulk = Some(now);
        let mut outcome = BulkOutcome::default();
        for (at, u) in resolved.into_iter().zip(updates) {
            if ch.timestamps.contains(&at) {
                outcome.duplicates += 1;
            } else {
                ch.push(at, &u.values, WriteOrigin::Bulk);
                outcome.stored += 1;
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(id: u64) -> ChannelId {
        ChannelId::new(id).unwrap()
    }

    fn store(interval_secs: u64) -> Store {
        Store::new(
            [
                ChannelSpec::new(ch(1), "W", "R"),
                ChannelSpec::new(ch(2), "W2", "R2").with_interval(Duration::ZERO),
            ],
            Limits {
                default_interval: Duration::from_secs(interval_secs),
                bulk_interval: Duration::from_secs(15),
                max_bulk_updates: 3,
            },
        )
    }

    fn f1() -> Target {
        Target::Field(Field::new(1).unwrap())
    }

    fn upd(field1: &str, at: Option<&str>) -> ChannelUpdate {
        let mut u = ChannelUpdate::new();
        u.set(f1(), field1);
        u.created_at = at.map(|s| s.parse().unwrap());
        u
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn accepted_updates_get_incrementing_ids_and_now() {
        let mut s = store(15);
        let t0 = Instant::now();
        let wall = t("2026-01-01T00:00:00Z");
        let e1 = s
            .write(ch(1), &upd("1", None), WriteOrigin::Mqtt, t0, wall)
            .unwrap();
        assert_eq!((e1.entry_id(), e1.created_at()), (1, wall));
        let later = t0 + Duration::from_secs(15);
        let at = Some("2025-12-31T23:59:00Z");
        let e2 = s
            .write(ch(1), &upd("2", at), WriteOrigin::Mqtt, later, wall)
            .unwrap();
        assert_eq!(e2.entry_id(), 2);
        assert_eq!(format_timestamp(&e2.created_at()), "2025-12-31T23:59:00Z");
        assert_eq!(s.last_entry(ch(1)).unwrap().field(1), Some("2"));
    }

    #[test]
    fn updates_inside_the_interval_are_rate_limited() {
        let mut s = store(15);
        let t0 = Instant::now();
        let wall = t("2026-01-01T00:00:00Z");
        let wall2 = t("2026-01-01T00:00:15Z");
        s.write(ch(1), &upd("1", None), WriteOrigin::Mqtt, t0, wall)
            .unwrap();
        let t14 = t0 + Duration::from_secs(14);
        let err = s.write(ch(1), &upd("2", None), WriteOrigin::UpdateApi, t14, wall2);
        assert!(matches!(err, Err(WriteRejected::RateLimited { .. })));
        // The dropped write did not move the window.
        let t15 = t0 + Duration::from_secs(15);
        assert!(s
            .write(ch(1), &upd("3", None), WriteOrigin::Mqtt, t15, wall2)
            .is_ok());
        assert_eq!(s.entries(ch(1)).unwrap().len(), 2);
    }

    #[test]
    fn repeated_created_at_is_rejected() {
        let mut s = store(15);
        let t0 = Instant::now();
        let at = Some("2026-01-01T00:00:00Z");
        s.write(ch(2), &upd("1", at), WriteOrigin::Mqtt, t0, Utc::now())
            .unwrap();
        let err = s.write(ch(2), &upd("2", at), WriteOrigin::Mqtt, t0, Utc::now());
        assert!(matches!(err, Err(WriteRejected::DuplicateTimestamp { .. })));
        assert_eq!(s.entries(ch(2)).unwrap().len(), 1);
    }

    #[test]
    fn unknown_channel_is_rejected() {
        let mut s = store(15);
        let err = s.write(
            ch(9),
            &upd("1", None),
            WriteOrigin::Mqtt,
            Instant::now(),
            Utc::now(),
        );
        assert_eq!(err.unwrap_err(), WriteRejected::UnknownChannel(ch(9)));
    }

    #[test]
    fn bulk_limits_size_and_spacing_and_skips_duplicates() {
        let mut s = store(15);
        let t0 = Instant::now();
        let wall = t("2026-01-01T00:00:00Z");
        let at = |s: &str| BulkUpdate {
            time: BulkTime::At(t(s)),
            values: BTreeMap::from([(f1(), "1".to_string())]),
        };
        let four = vec![at("2025-01-01T00:00:00Z"); 4];
        let err = s.bulk(ch(1), &four, t0, wall);
        assert_eq!(err, Err(BulkRejected::TooMany { count: 4, max: 3 }));
        let calls = [
            at("2025-01-01T00:00:00Z"),
            at("2025-01-01T00:00:00Z"),
            at("2025-01-01T00:00:01Z"),
        ];
        let ok = s.bulk(ch(1), &calls, t0, wall).unwrap();
        assert_eq!(
            ok,
            BulkOutcome {
                stored: 2,
                duplicates: 1
            }
        );
        let next = [at("2025-01-01T00:00:02Z")];
        let again = s.bulk(ch(1), &next, t0 + Duration::from_secs(5), wall);
        assert!(matches!(again, Err(BulkRejected::TooFrequent { .. })));
        assert!(s
            .bulk(ch(1), &next, t0 + Duration::from_secs(15), wall)
            .is_ok());
        assert!(s
            .entries(ch(1))
            .unwrap()
            .iter()
            .all(|e| e.origin == WriteOrigin::Bulk));
    }

    #[test]
    fn bulk_delta_t_counts_from_the_last_entry() {
        let mut s = store(15);
        let wall = t("2026-01-01T00:00:00Z");
        let d = |n| BulkUpdate {
            time: BulkTime::Delta(n),
            values: BTreeMap::from([(f1(), "1".to_string())]),
        };
        s.bulk(ch(1), &[d(0.0), d(10.0)], Instant::now(), wall)
            .unwrap();
        let times: Vec<String> = s
            .entries(ch(1))
            .unwrap()
            .iter()
            .map(|e| format_timestamp(&e.created_at()))
            .collect();
        assert_eq!(times, ["2026-01-01T00:00:00Z", "2026-01-01T00:00:10Z"]);
        let zero = s.bulk(ch(2), &[d(5.0), d(0.0)], Instant::now(), wall);
        assert_eq!(zero.unwrap_err(), BulkRejected::BadDelta { index: 1 });
        assert!(s.entries(ch(2)).unwrap().is_empty());
    }

    #[test]
    fn inspection_json_is_subscriber_json_plus_origin() {
        let mut s = store(0);
        let wall = t("2026-01-01T00:00:00Z");
        let e = s
            .write(
                ch(1),
                &upd("21.5", None),
                WriteOrigin::Mqtt,
                Instant::now(),
                wall,
            )
            .unwrap();
        let j = serde_json::to_value(&e).unwrap();
        assert_eq!(j["channel_id"], 1);
        assert_eq!(j["entry_id"], 1);
        assert_eq!(j["created_at"], "2026-01-01T00:00:00Z");
        assert_eq!(j["field1"], "21.5");
        assert!(j["field2"].is_null() && j["status"].is_null());
        assert_eq!(j["origin"], "mqtt");
    }
}
