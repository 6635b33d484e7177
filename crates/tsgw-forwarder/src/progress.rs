//! Backfill progress: how much of a channel's backlog is left, as gauges and
//! as one log line per channel every [`LOG_EVERY`] (windows and readings
//! left, the rate it goes down at, and when it will be done at that rate).
//!
//! The backlog is what waits behind a channel's newest closed window: those
//! windows go by bulk call (or merged over MQTT), the newest goes live.

use std::collections::HashMap;
use std::time::Duration;

use thingspeak::ChannelId;
use tokio::time::Instant;
use tsgw_core::Metrics;

/// A progress line per channel at most this often while it has a backlog.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// What is left of one channel's backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub windows: u64,
    pub readings: u64,
}

struct Track {
    /// Since when the channel has had a backlog without a break.
    since: Instant,
    /// The last line (or `since`), and the readings left then.
    logged_at: Instant,
    readings_then: u64,
    /// A line was logged for this backlog: its end is logged too.
    logged: bool,
}

/// Per-channel backlog bookkeeping for gauges and the periodic log line.
#[derive(Default)]
pub struct Progress {
    tracks: HashMap<ChannelId, Track>,
}

impl Progress {
    /// Records the channel's backlog as seen now: sets the gauges, and logs
    /// progress every [`LOG_EVERY`] while the backlog lasts. A backlog of a
    /// window or two that comes and goes (a window waiting for its slot) is
    /// not worth a line: the first comes after [`LOG_EVERY`] without a break.
    pub fn observe(&mut self, channel: ChannelId, left: Backlog, now: Instant, metrics: &Metrics) {
        let label = channel.to_string();
        metrics
            .backfill_remaining_windows
            .with_label_values(&[&label])
            .set(i64::try_from(left.windows).unwrap_or(i64::MAX));
        metrics
            .backfill_remaining_readings
            .with_label_values(&[&label])
            .set(i64::try_from(left.readings).unwrap_or(i64::MAX));
        if left.windows == 0 {
            if let Some(track) = self.tracks.remove(&channel) {
                if track.logged {
                    let secs = now.duration_since(track.since).as_secs();
                    tracing::info!(%channel, "backfill done after {secs} s");
                }
            }
            return;
        }
        let track = self.tracks.entry(channel).or_insert(Track {
            since: now,
            logged_at: now,
            readings_then: left.readings,
            logged: false,
        });
        let elapsed = now.duration_since(track.logged_at);
        if elapsed < LOG_EVERY {
            return;
        }
        let rate = rate(track.readings_then, left.readings, elapsed);
        match eta(left.readings, rate) {
            Some(eta) => tracing::info!(
                %channel,
                windows_left = left.windows,
                readings_left = left.readings,
                readings_per_sec = format!("{rate:.1}"),
                eta_secs = eta.as_secs(),
                "backfill progress"
            ),
            None => tracing::warn!(
                %channel,
                windows_left = left.windows,
                readings_left = left.readings,
                "backfill progress: the backlog did not shrink in the last {} s",
                elapsed.as_secs()
            ),
        }
        track.logged_at = now;
        track.readings_then = left.readings;
        track.logged = true;
    }
}

/// Readings per second the backlog went down by (0 if it did not).
fn rate(then: u64, now: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    then.saturating_sub(now) as f64 / secs
}

/// Time to work off `left` readings at `rate`; none when it does not shrink.
fn eta(left: u64, rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch() -> ChannelId {
        ChannelId::new(7).unwrap()
    }

    #[test]
    fn rate_and_eta_come_from_the_shrinking_backlog() {
        assert_eq!(rate(1000, 400, Duration::from_secs(30)), 20.0);
        assert_eq!(rate(400, 500, Duration::from_secs(30)), 0.0, "grew");
        assert_eq!(eta(400, 20.0), Some(Duration::from_secs(20)));
        assert_eq!(eta(400, 0.0), None);
    }

    #[tokio::test]
    async fn gauges_follow_the_backlog_and_reset_when_done() {
        let metrics = Metrics::new();
        let mut p = Progress::default();
        let t0 = Instant::now();
        let gauges = |m: &Metrics| {
            (
                m.backfill_remaining_windows.with_label_values(&["7"]).get(),
                m.backfill_remaining_readings
                    .with_label_values(&["7"])
                    .get(),
            )
        };
        p.observe(
            ch(),
            Backlog {
                windows: 10,
                readings: 900,
            },
            t0,
            &metrics,
        );
        assert_eq!(gauges(&metrics), (10, 900));
        assert_eq!(p.tracks[&ch()].readings_then, 900);
        assert!(!p.tracks[&ch()].logged, "no line before the backlog lasted");
        p.observe(
            ch(),
            Backlog {
                windows: 4,
                readings: 300,
            },
            t0 + LOG_EVERY,
            &metrics,
        );
        assert_eq!(gauges(&metrics), (4, 300));
        assert_eq!(
            p.tracks[&ch()].readings_then,
            300,
            "logged, next line from here"
        );
        p.observe(
            ch(),
            Backlog {
                windows: 0,
                readings: 0,
            },
            t0 + LOG_EVERY * 2,
            &metrics,
        );
        assert_eq!(gauges(&metrics), (0, 0));
        assert!(p.tracks.is_empty());
    }
}
