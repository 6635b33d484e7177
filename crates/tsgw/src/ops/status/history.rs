//! What the counters did lately: the page shows errors and drops of the last
//! hour (not only since start), the reason of the last upstream disconnect,
//! and how fast a backfill goes (for its ETA).
//!
//! A task samples the registry every [`TICK`]. Counter values are kept once a
//! minute for an hour ([`MINUTES`] samples) of the families in [`TRACKED`];
//! the backfill gauges for the last [`RATE_TICKS`] ticks. Bounded by the
//! number of label sets the stages create, times those constants.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::families::Families;

/// How often the registry is sampled.
pub const TICK: Duration = Duration::from_secs(10);
/// Counter samples kept: one a minute for an hour, plus the current minute.
const MINUTES: usize = 61;
/// Ticks over which a backfill's rate is measured (a minute).
const RATE_TICKS: usize = 7;
/// Label sets kept per sample at most, so a label explosion cannot grow it.
const MAX_LABEL_SETS: usize = 2000;

/// Counter families whose last hour the page shows.
pub const TRACKED: &[&str] = &[
    "tsgw_device_errors_total",
    "tsgw_parse_errors_total",
    "tsgw_mqtt_denied_total",
    "tsgw_queue_dropped_total",
    "tsgw_updates_dropped_total",
    "tsgw_upstream_disconnects_total",
];

const DISCONNECTS: &str = "tsgw_upstream_disconnects_total";
const BACKFILL_READINGS: &str = "tsgw_backfill_remaining_readings";

type Key = (&'static str, BTreeMap<String, String>);
type Counters = HashMap<Key, f64>;

/// The last upstream disconnect seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    /// Within one [`TICK`] of when it happened.
    pub seen_at: DateTime<Utc>,
    pub connection: String,
    pub reason: String,
}

#[derive(Clone, Default)]
pub struct History {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    minutes: VecDeque<(DateTime<Utc>, Counters)>,
    last_tick: Option<Counters>,
    last_disconnect: Option<Disconnect>,
    backfill: VecDeque<(DateTime<Utc>, HashMap<String, f64>)>,
}

impl History {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one sample of the registry taken at `now`.
    pub fn tick(&self, families: &Families, now: DateTime<Utc>) {
        let counters = tracked(families);
        let mut state = self.lock();
        if let Some(previous) = &state.last_tick {
            // The disconnect counter that grew most since the last tick.
            let grown = counters
                .iter()
                .filter(|((name, _), _)| *name == DISCONNECTS)
                .map(|(key, value)| (key, value - previous.get(key).copied().unwrap_or(0.0)))
                .filter(|(_, delta)| *delta > 0.0)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some(((_, labels), _)) = grown {
                state.last_disconnect = Some(Disconnect {
                    seen_at: now,
                    connection: labels.get("connection").cloned().unwrap_or_default(),
                    reason: labels.get("reason").cloned().unwrap_or_default(),
                });
            }
        }
        let minute_due = state
            .minutes
            .back()
            .is_none_or(|(at, _)| now - *at >= chrono::Duration::seconds(60));
        if minute_due {
            state.minutes.push_back((now, counters.clone()));
            while state.minutes.len() > MINUTES {
                state.minutes.pop_front();
            }
        }
        state.last_tick = Some(counters);
        let remaining = families
            .samples(BACKFILL_READINGS)
            .iter()
            .map(|s| (s.label("channel").to_owned(), s.value))
            .collect();
        state.backfill.push_back((now, remaining));
        while state.backfill.len() > RATE_TICKS {
            state.backfill.pop_front();
        }
    }

    /// How much the counter with exactly these labels grew in the last hour
    /// (since start, for a gateway younger than that).
    pub fn last_hour(
        &self,
        families: &Families,
        name: &str,
        labels: &BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> f64 {
        let current = families
            .samples(name)
            .iter()
            .find(|s| &s.labels == labels)
            .map_or(0.0, |s| s.value);
        let state = self.lock();
        let hour_ago = now - chrono::Duration::seconds(3600);
        let baseline = state
            .minutes
            .iter()
            .find(|(at, _)| *at >= hour_ago)
            .and_then(|(_, counters)| {
                counters
                    .iter()
                    .find(|((n, l), _)| *n == name && l == labels)
                    .map(|(_, v)| *v)
            })
            .unwrap_or(0.0);
        (current - baseline).max(0.0)
    }

    pub fn last_disconnect(&self) -> Option<Disconnect> {
        self.lock().last_disconnect.clone()
    }

    /// Readings per second by which `channel`'s backfill shrank over the last
    /// minute; `None` until two ticks saw it, `Some(0.0)` if it did not shrink.
    pub fn backfill_rate(&self, channel: &str) -> Option<f64> {
        let state = self.lock();
        let first = state
            .backfill
            .iter()
            .find(|(_, m)| m.contains_key(channel))?;
        let last = state.backfill.back()?;
        let secs = (last.0 - first.0).num_milliseconds() as f64 / 1000.0;
        if secs <= 0.0 {
            return None;
        }
        let shrunk = first.1.get(channel)? - last.1.get(channel)?;
        Some((shrunk / secs).max(0.0))
    }
}

fn tracked(families: &Families) -> Counters {
    let mut out = Counters::new();
    for name in TRACKED {
        for sample in families.samples(name) {
            if out.len() >= MAX_LABEL_SETS {
                return out;
            }
            out.insert((name, sample.labels.clone()), sample.value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn errors(n: f64) -> Families {
        Families::from_samples([(
            "tsgw_device_errors_total",
            &[("device", "plc"), ("kind", "timeout"), ("source", "modbus")][..],
            n,
        )])
    }

    #[test]
    fn the_last_hour_is_the_growth_since_the_sample_an_hour_ago() {
        let h = History::default();
        let l = labels(&[("device", "plc"), ("kind", "timeout"), ("source", "modbus")]);
        h.tick(&errors(0.0), at(0));
        h.tick(&errors(5.0), at(1800));
        // Younger than an hour: everything since start.
        assert_eq!(
            h.last_hour(&errors(7.0), "tsgw_device_errors_total", &l, at(1800)),
            7.0
        );
        h.tick(&errors(7.0), at(3700));
        // The sample at 0 is older than an hour now; the one at 1800 is the baseline.
        assert_eq!(
            h.last_hour(&errors(7.0), "tsgw_device_errors_total", &l, at(3700)),
            2.0
        );
    }

    #[test]
    fn samples_are_bounded() {
        let h = History::default();
        for i in 0..500 {
            h.tick(&errors(f64::from(i)), at(i64::from(i) * 10));
        }
        let state = h.lock();
        assert!(state.minutes.len() <= MINUTES);
        assert!(state.backfill.len() <= RATE_TICKS);
    }

    #[test]
    fn the_last_disconnect_reason_is_the_counter_that_grew() {
        let h = History::default();
        let disconnects = |idle: f64, reset: f64| {
            Families::from_samples([
                (
                    DISCONNECTS,
                    &[("connection", "main"), ("reason", "idle")][..],
                    idle,
                ),
                (
                    DISCONNECTS,
                    &[("connection", "main"), ("reason", "reset")][..],
                    reset,
                ),
            ])
        };
        h.tick(&disconnects(4.0, 0.0), at(0));
        assert_eq!(h.last_disconnect(), None);
        h.tick(&disconnects(4.0, 1.0), at(10));
        let d = h.last_disconnect().unwrap();
        assert_eq!(
            (d.connection.as_str(), d.reason.as_str(), d.seen_at),
            ("main", "reset", at(10))
        );
    }

    #[test]
    fn backfill_rate_from_the_gauge() {
        let h = History::default();
        let left =
            |n: f64| Families::from_samples([(BACKFILL_READINGS, &[("channel", "7")][..], n)]);
        h.tick(&left(1000.0), at(0));
        assert_eq!(h.backfill_rate("7"), None);
        h.tick(&left(800.0), at(10));
        h.tick(&left(600.0), at(20));
        assert_eq!(h.backfill_rate("7"), Some(20.0));
        assert_eq!(h.backfill_rate("8"), None);
    }
}
