//! What recently entered the queue: each device's last reading and values,
//! each channel field's last hour in buckets (for the plots), each MQTT
//! account's last publish through a mapping rule, and a live feed of stored
//! readings for `tsgw tail`.
//!
//! The queue writer hands every batch it stored, with the MQTT accounts that
//! published it, to [`RecentReadings::observe_published`]; everything here
//! is bounded, whatever the devices send: at most [`MAX_DEVICES`] devices
//! and [`MAX_PUBLISHERS`] accounts (the longest quiet is forgotten first), at
//! most [`MAX_VALUES_PER_DEVICE`] last values per device, at most
//! [`MAX_SERIES`] plotted fields of [`BUCKETS`] buckets each, and a tail feed
//! of [`TAIL_BATCHES`] batches that a slow follower lags behind rather than
//! holds up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tsgw_core::{ChannelId, Origin, Reading, Target, Value};

/// Devices remembered; beyond this the one quiet longest is forgotten.
pub const MAX_DEVICES: usize = 256;
/// MQTT accounts remembered; beyond this the one quiet longest is forgotten.
pub const MAX_PUBLISHERS: usize = 256;
/// Last values kept per device (one per channel and target).
pub const MAX_VALUES_PER_DEVICE: usize = 16;
/// Channel fields plotted; fields beyond this are not plotted.
pub const MAX_SERIES: usize = 256;
/// Seconds per plot bucket.
pub const BUCKET_SECS: i64 = 30;
/// The plotted span: one hour.
pub const HISTORY_SECS: i64 = 3600;
/// Buckets per plotted field (one hour, plus the one being filled).
pub const BUCKETS: usize = (HISTORY_SECS / BUCKET_SECS) as usize + 1;
/// Batches the tail feed holds for a follower that reads slowly (each up
/// to the writer's 512 readings: a few MiB at most, and only while someone
/// follows).
pub const TAIL_BATCHES: usize = 64;

/// A stored batch, as the tail feed carries it.
pub type TailBatch = Arc<Vec<Reading>>;

/// Shared handle: the writer observes, the status page and the tail read.
#[derive(Clone)]
pub struct RecentReadings {
    inner: Arc<Mutex<Tracker>>,
    tail: broadcast::Sender<TailBatch>,
}

impl Default for RecentReadings {
    fn default() -> Self {
        Self::new()
    }
}

/// One device's latest.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecent {
    /// When its last reading entered the queue.
    pub last_stored: DateTime<Utc>,
    /// When its last reading was measured.
    pub last_measured: DateTime<Utc>,
    /// Last value per channel and target.
    pub values: BTreeMap<(ChannelId, Target), Value>,
    /// Readings stored since the gateway started.
    pub readings: u64,
}

impl DeviceRecent {
    fn update(&mut self, reading: &Reading, now: DateTime<Utc>) {
        self.last_stored = now;
        self.last_measured = self.last_measured.max(reading.measured_at);
        self.readings += 1;
        let key = (reading.channel, reading.target);
        if let Some(value) = self.values.get_mut(&key) {
            value.clone_from(&reading.value);
        } else if self.values.len() < MAX_VALUES_PER_DEVICE {
            self.values.insert(key, reading.value.clone());
        }
    }
}

/// What an MQTT account last sent through a mapping rule. Its readings are
/// the rule's (named after it); this is what shows the account is sending.
#[derive(Debug, Clone, PartialEq)]
pub struct PublisherRecent {
    /// When its last reading entered the queue.
    pub last_stored: DateTime<Utc>,
    /// When its last reading was measured.
    pub last_measured: DateTime<Utc>,
    /// The rule that made its last reading.
    pub rule: String,
    /// That reading's channel.
    pub channel: ChannelId,
    /// Readings stored through rules since the gateway started.
    pub readings: u64,
}

impl PublisherRecent {
    fn update(&mut self, reading: &Reading, now: DateTime<Utc>) {
        self.last_stored = now;
        self.last_measured = self.last_measured.max(reading.measured_at);
        self.readings += 1;
        self.channel = reading.channel;
        // Reuses the name's buffer: the same rule (the usual case) costs a
        // comparison, another one allocates only if its name is longer.
        if self.rule != reading.origin.device {
            self.rule.clone_from(&reading.origin.device);
        }
    }
}

/// One plot bucket: the numbers measured in `[start, start + BUCKET_SECS)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Unix seconds, a multiple of [`BUCKET_SECS`].
    pub start: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: u32,
}

impl Bucket {
    pub fn mean(&self) -> f64 {
        self.sum / f64::from(self.count.max(1))
    }
}

#[derive(Default)]
struct Tracker {
    devices: HashMap<Origin, DeviceRecent>,
    publishers: HashMap<Arc<str>, PublisherRecent>,
    series: HashMap<(ChannelId, Target), VecDeque<Bucket>>,
    /// Numbers that could not be plotted because [`MAX_SERIES`] was reached.
    unplotted: u64,
}

/// A copy of the tracker's state, for one page render.
#[derive(Debug, Clone, Default)]
pub struct RecentSnapshot {
    pub devices: BTreeMap<Origin, DeviceRecent>,
    /// By account name.
    pub publishers: BTreeMap<String, PublisherRecent>,
    /// Buckets of the last hour, oldest first.
    pub series: BTreeMap<(ChannelId, Target), Vec<Bucket>>,
    pub unplotted: u64,
}

impl RecentReadings {
    pub fn new() -> Self {
        let (tail, _) = broadcast::channel(TAIL_BATCHES);
        Self {
            inner: Arc::new(Mutex::new(Tracker::default())),
            tail,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tracker> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readings stored at `now` with no account known to have sent them.
    #[cfg(test)]
    pub fn observe_at(&self, readings: &[Reading], now: DateTime<Utc>) {
        self.observe_published_at(readings, &[], now);
    }

    /// Records readings that were just stored in the queue, with the MQTT
    /// accounts that published them: `readings[range]` came from `account`.
    pub fn observe_published(&self, readings: &[Reading], publishers: &[(Arc<str>, Range<usize>)]) {
        self.observe_published_at(readings, publishers, Utc::now());
    }

    pub fn observe_published_at(
        &self,
        readings: &[Reading],
        publishers: &[(Arc<str>, Range<usize>)],
        now: DateTime<Utc>,
    ) {
        if readings.is_empty() {
            return;
        }
        {
            let mut tracker = self.lock();
            tracker.observe(readings, now);
            for (account, range) in publishers {
                if let Some(published) = readings.get(range.clone()) {
                    tracker.published(account, published, now);
                }
            }
        }
        // Copying the batch costs only while someone follows.
        if self.tail.receiver_count() > 0 {
            let _ = self.tail.send(Arc::new(readings.to_vec()));
        }
    }

    /// A live feed of the batches stored from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TailBatch> {
        self.tail.subscribe()
    }

    pub fn snapshot(&self, now: DateTime<Utc>) -> RecentSnapshot {
        let mut tracker = self.lock();
        tracker.prune(now);
        RecentSnapshot {
            devices: tracker
                .devices
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            publishers: tracker
                .publishers
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            series: tracker
                .series
                .iter()
                .map(|(k, v)| (*k, v.iter().copied().collect()))
                .collect(),
            unplotted: tracker.unplotted,
        }
    }
}

impl Tracker {
    fn observe(&mut self, readings: &[Reading], now: DateTime<Utc>) {
        for reading in readings {
            self.device(reading, now);
            if let Some(number) = reading.value.as_f64() {
                self.plot(reading, number, now);
            }
        }
    }

    fn device(&mut self, reading: &Reading, now: DateTime<Utc>) {
        // The common case, a known device, allocates nothing.
        if let Some(device) = self.devices.get_mut(&reading.origin) {
            device.update(reading, now);
            return;
        }
        if self.devices.len() >= MAX_DEVICES {
            let quietest = self
                .devices
                .iter()
                .min_by_key(|(_, d)| d.last_stored)
                .map(|(origin, _)| origin.clone());
            if let Some(origin) = quietest {
                self.devices.remove(&origin);
            }
        }
        let mut device = DeviceRecent {
            last_stored: now,
            last_measured: reading.measured_at,
            values: BTreeMap::new(),
            readings: 0,
        };
        device.update(reading, now);
        self.devices.insert(reading.origin.clone(), device);
    }

    /// `account`'s readings: those a rule made (named after the rule) are
    /// its last publish; drop-in readings carry the account's own name and
    /// are its device row already.
    fn published(&mut self, account: &Arc<str>, readings: &[Reading], now: DateTime<Utc>) {
        for reading in readings {
            if reading.origin.device == **account {
                continue;
            }
            // The common case, a known account, allocates nothing.
            if let Some(publisher) = self.publishers.get_mut(account) {
                publisher.update(reading, now);
                continue;
            }
            if self.publishers.len() >= MAX_PUBLISHERS {
                let quietest = self
                    .publishers
                    .iter()
                    .min_by_key(|(_, p)| p.last_stored)
                    .map(|(account, _)| account.clone());
                if let Some(account) = quietest {
                    self.publishers.remove(&account);
                }
            }
            let mut publisher = PublisherRecent {
                last_stored: now,
                last_measured: reading.measured_at,
                rule: reading.origin.device.clone(),
                channel: reading.channel,
                readings: 0,
            };
            publisher.update(reading, now);
            self.publishers.insert(account.clone(), publisher);
        }
    }

    fn plot(&mut self, reading: &Reading, number: f64, now: DateTime<Utc>) {
        let measured = reading.measured_at.timestamp();
        let oldest = now.timestamp() - HISTORY_SECS;
        // Backfilled or late readings older than the plotted hour are not drawn.
        if measured < oldest || measured > now.timestamp() + BUCKET_SECS {
            return;
        }
        let key = (reading.channel, reading.target);
        if !self.series.contains_key(&key) && self.series.len() >= MAX_SERIES {
            self.unplotted += 1;
            return;
        }
        let buckets = self.series.entry(key).or_default();
        let start = measured - measured.rem_euclid(BUCKET_SECS);
        // Readings arrive in time order almost always: look from the back.
        let position = buckets.iter().rposition(|b| b.start <= start);
        match position {
            Some(i) if buckets[i].start == start => {
                let b = &mut buckets[i];
                b.min = b.min.min(number);
                b.max = b.max.max(number);
                b.sum += number;
                b.count = b.count.saturating_add(1);
            }
            _ => {
                let at = position.map_or(0, |i| i + 1);
                buckets.insert(
                    at,
                    Bucket {
                        start,
                        min: number,
                        max: number,
                        sum: number,
                        count: 1,
                    },
                );
            }
        }
        while buckets.len() > BUCKETS
            || buckets
                .front()
                .is_some_and(|b| b.start < oldest - BUCKET_SECS)
        {
            buckets.pop_front();
        }
    }

    /// Forgets buckets older than the plotted hour, and fields left empty.
    fn prune(&mut self, now: DateTime<Utc>) {
        let oldest = now.timestamp() - HISTORY_SECS - BUCKET_SECS;
        self.series.retain(|_, buckets| {
            while buckets.front().is_some_and(|b| b.start < oldest) {
                buckets.pop_front();
            }
            !buckets.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use tsgw_core::{Field, SourceKind};

    /// A bucket boundary (a multiple of 30 s) plus `secs`.
    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_010 + secs, 0).unwrap()
    }

    fn reading(device: &str, field: u8, value: Value, measured: i64) -> Reading {
        Reading {
            channel: ChannelId::new(7).unwrap(),
            target: Target::Field(Field::new(field).unwrap()),
            value,
            measured_at: at(measured),
            origin: Origin::new(SourceKind::Serial, device),
        }
    }

    #[test]
    fn devices_keep_their_last_values_and_times() {
        let recent = RecentReadings::new();
        recent.observe_at(
            &[
                reading("a", 1, Value::Number(1.0), 0),
                reading("a", 2, Value::Text("on".into()), 1),
                reading("a", 1, Value::Number(2.5), 2),
            ],
            at(3),
        );
        let snap = recent.snapshot(at(4));
        let a = &snap.devices[&Origin::new(SourceKind::Serial, "a")];
        assert_eq!(a.readings, 3);
        assert_eq!(a.last_stored, at(3));
        assert_eq!(a.last_measured, at(2));
        assert_eq!(
            a.values.values().cloned().collect::<Vec<_>>(),
            vec![Value::Number(2.5), Value::Text("on".into())]
        );
    }

    #[test]
    fn numbers_are_bucketed_by_measured_time_and_an_hour_is_kept() {
        let recent = RecentReadings::new();
        let batch: Vec<Reading> = [(0, 1.0), (10, 3.0), (31, 5.0), (-4000, 9.0)]
            .into_iter()
            .map(|(t, v)| reading("a", 1, Value::Number(v), t))
            .collect();
        recent.observe_at(&batch, at(40));
        let snap = recent.snapshot(at(40));
        let buckets = &snap.series[&(
            ChannelId::new(7).unwrap(),
            Target::Field(Field::new(1).unwrap()),
        )];
        // The reading from before the hour is not plotted.
        assert_eq!(buckets.len(), 2);
        assert_eq!(
            (buckets[0].min, buckets[0].max, buckets[0].mean()),
            (1.0, 3.0, 2.0)
        );
        assert_eq!(buckets[1].count, 1);
        // An hour later only what is newer than an hour remains.
        let later = recent.snapshot(at(40 + HISTORY_SECS + 2 * BUCKET_SECS));
        assert!(later.series.is_empty());
    }

    #[test]
    fn late_readings_land_in_their_bucket_in_order() {
        let recent = RecentReadings::new();
        recent.observe_at(&[reading("a", 1, Value::Number(1.0), 100)], at(100));
        recent.observe_at(&[reading("a", 1, Value::Number(2.0), 10)], at(101));
        let snap = recent.snapshot(at(101));
        let starts: Vec<i64> = snap
            .series
            .values()
            .next()
            .unwrap()
            .iter()
            .map(|b| b.start)
            .collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
        assert_eq!(starts.len(), 2);
    }

    #[test]
    fn memory_stays_bounded() {
        let recent = RecentReadings::new();
        for d in 0..(MAX_DEVICES + 10) {
            let mut r = reading(&format!("d{d}"), 1, Value::Number(1.0), 0);
            r.channel = ChannelId::new(d as u64 + 1).unwrap();
            recent.observe_at(&[r], at(d as i64));
        }
        for t in 0..(BUCKETS as i64 * 3) {
            recent.observe_at(
                &[reading("busy", 1, Value::Number(1.0), t * BUCKET_SECS)],
                at(t * BUCKET_SECS),
            );
        }
        let snap = recent.snapshot(at(BUCKETS as i64 * 3 * BUCKET_SECS));
        assert!(snap.devices.len() <= MAX_DEVICES);
        // The first devices, quiet longest, were forgotten; the busy one is kept.
        assert!(!snap
            .devices
            .contains_key(&Origin::new(SourceKind::Serial, "d0")));
        assert!(snap
            .devices
            .contains_key(&Origin::new(SourceKind::Serial, "busy")));
        assert!(snap.series.len() <= MAX_SERIES);
        assert!(snap.unplotted > 0);
        assert!(snap.series.values().all(|b| b.len() <= BUCKETS));
    }

    fn mqtt(rule: &str, channel: u64, measured: i64) -> Reading {
        let mut r = reading(rule, 1, Value::Number(1.0), measured);
        r.origin.source = SourceKind::Mqtt;
        r.channel = ChannelId::new(channel).unwrap();
        r
    }

    #[test]
    fn accounts_publishing_through_rules_are_remembered() {
        let recent = RecentReadings::new();
        let esp: Arc<str> = Arc::from("esp");
        let batch = [
            mqtt("greenhouse", 1002, 5),
            // Its own drop-in publish: that is the account's device row already.
            mqtt("esp", 1001, 6),
            // Another account's batch in the same write.
            mqtt("kitchen", 1003, 7),
        ];
        recent.observe_published_at(
            &batch,
            &[(esp.clone(), 0..2), (Arc::from("other"), 2..3)],
            at(10),
        );
        let snap = recent.snapshot(at(11));
        let seen = &snap.publishers["esp"];
        assert_eq!(
            (seen.rule.as_str(), seen.channel, seen.readings),
            ("greenhouse", ChannelId::new(1002).unwrap(), 1)
        );
        assert_eq!((seen.last_stored, seen.last_measured), (at(10), at(5)));
        assert_eq!(snap.publishers["other"].rule, "kitchen");
        // A later publish through another rule moves it there.
        recent.observe_published_at(&[mqtt("shed", 1004, 20)], &[(esp, 0..1)], at(21));
        let seen = &recent.snapshot(at(22)).publishers["esp"];
        assert_eq!(
            (
                seen.rule.as_str(),
                seen.channel,
                seen.readings,
                seen.last_stored
            ),
            ("shed", ChannelId::new(1004).unwrap(), 2, at(21))
        );
        // The readings count for their rules' devices as before.
        assert_eq!(
            recent.snapshot(at(22)).devices[&Origin::new(SourceKind::Mqtt, "greenhouse")].readings,
            1
        );
    }

    #[test]
    fn accounts_stay_bounded() {
        let recent = RecentReadings::new();
        for n in 0..(MAX_PUBLISHERS + 10) {
            let account: Arc<str> = Arc::from(format!("user{n}").as_str());
            recent.observe_published_at(
                &[mqtt("rule", 1, n as i64)],
                &[(account, 0..1)],
                at(n as i64),
            );
        }
        let snap = recent.snapshot(at(MAX_PUBLISHERS as i64 + 10));
        assert_eq!(snap.publishers.len(), MAX_PUBLISHERS);
        assert!(!snap.publishers.contains_key("user0"), "the quietest stays");
        assert!(snap
            .publishers
            .contains_key(&format!("user{}", MAX_PUBLISHERS + 9)));
    }

    #[test]
    fn a_known_device_and_account_update_allocates_nothing() {
        let recent = RecentReadings::new();
        let esp: Arc<str> = Arc::from("esp");
        let publishers = [(esp, 0..2)];
        let batch = [mqtt("greenhouse", 1002, 5), mqtt("greenhouse", 1002, 6)];
        recent.observe_published_at(&batch, &publishers, at(10));
        let allocations = counting::allocations_during(|| {
            recent.observe_published_at(&batch, &publishers, at(11));
        });
        assert_eq!(allocations, 0);
        // The counter does see allocations.
        assert!(counting::allocations_during(|| drop(std::hint::black_box(vec![1u8; 16]))) > 0);
        assert_eq!(recent.snapshot(at(12)).publishers["esp"].readings, 4);
    }

    /// Counts the allocations of the calling thread (other tests' threads
    /// allocate meanwhile and must not count).
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        struct Counting;

        thread_local! {
            static COUNT: Cell<Option<u64>> = const { Cell::new(None) };
        }

        // SAFETY: every call is passed to the system allocator unchanged.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                count();
                System.alloc(layout)
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                System.dealloc(ptr, layout)
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                count();
                System.alloc_zeroed(layout)
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                count();
                System.realloc(ptr, layout, new_size)
            }
        }

        fn count() {
            // `try_with`: a thread being torn down has no counter any more.
            let _ = COUNT.try_with(|c| c.set(c.get().map(|n| n + 1)));
        }

        #[global_allocator]
        static ALLOCATOR: Counting = Counting;

        pub fn allocations_during(f: impl FnOnce()) -> u64 {
            COUNT.with(|c| c.set(Some(0)));
            f();
            COUNT.with(|c| c.replace(None)).unwrap_or(0)
        }
    }

    #[tokio::test]
    async fn followers_get_stored_batches() {
        let recent = RecentReadings::new();
        recent.observe_at(&[reading("before", 1, Value::Number(1.0), 0)], at(0));
        let mut follower = recent.subscribe();
        recent.observe_at(&[reading("after", 1, Value::Number(2.0), 1)], at(1));
        let batch = follower.recv().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].origin.device, "after");
    }
}
