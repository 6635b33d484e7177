//! Liveness and readiness, computed from the pipeline's heartbeat and metrics.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tsgw_core::Metrics;
use tsgw_forwarder::FeedHub;
use tsgw_queue::{OpenPhase, OpenProgress};

use crate::pipeline::heartbeat::Heartbeat;

/// The writer ticks every second; this much silence means it is stuck.
pub const MAX_HEARTBEAT_AGE: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Health {
    heartbeat: Heartbeat,
    metrics: Metrics,
    started: Instant,
    upstream_grace: Duration,
    last_upstream_seen: Arc<Mutex<Option<Instant>>>,
    /// While the queue opens, the writer cannot beat: say why.
    queue_opening: Option<OpenProgress>,
    /// ThingSpeak channel feeds (drop-in subscribers, downlink rules).
    feeds: Option<FeedHub>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    pub reasons: Vec<String>,
    pub queue_readings: i64,
    pub queue_bytes: i64,
    pub upstream_connected: bool,
    /// Each channel feed asked for: `subscribed`, `waiting`,
    /// `connection_down` or `refused` (the upstream subscription is down).
    pub feeds: Vec<FeedReport>,
}

#[derive(Debug, Serialize)]
pub struct FeedReport {
    pub channel: u64,
    pub state: &'static str,
    pub last_entry_id: Option<u64>,
}

impl Health {
    pub fn new(heartbeat: Heartbeat, metrics: Metrics, upstream_grace: Duration) -> Self {
        Self {
            heartbeat,
            metrics,
            started: Instant::now(),
            upstream_grace,
            last_upstream_seen: Arc::new(Mutex::new(None)),
            queue_opening: None,
            feeds: None,
        }
    }

    /// Reports the state of each channel feed; a refused one makes the
    /// gateway not ready (its subscribers and downlink rules get nothing).
    pub fn with_feeds(mut self, feeds: FeedHub) -> Self {
        self.feeds = Some(feeds);
        self
    }

    /// Reports a queue still opening as such, not as a stuck writer.
    pub fn with_queue_opening(mut self, progress: OpenProgress) -> Self {
        self.queue_opening = Some(progress);
        self
    }

    /// Alive: the pipeline's writer is making progress.
    pub fn liveness(&self) -> Report {
        let mut reasons = Vec::new();
        let age = self.heartbeat.age();
        let opening = self
            .queue_opening
            .as_ref()
            .map(OpenProgress::state)
            .filter(|s| !matches!(s.phase, OpenPhase::Open | OpenPhase::NotStarted));
        if let Some(state) = opening {
            reasons.push(format!(
                "the queue is still opening: {} for {}s ({} readings so far)",
                state.phase.describe(),
                state.elapsed.as_secs(),
                state.items
            ));
        } else if age > MAX_HEARTBEAT_AGE {
            reasons.push(format!(
                "queue writer has made no progress for {}s",
                age.as_secs()
            ));
        }
        self.report(reasons)
    }

    /// Ready: alive, and upstream connected now or within the grace period.
    pub fn readiness(&self) -> Report {
        let mut reasons = self.liveness().reasons;
        let connected = self.upstream_connected();
        let now = Instant::now();
        let mut seen = self
            .last_upstream_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if connected {
            *seen = Some(now);
        }
        let since = seen.unwrap_or(self.started);
        if !connected && now.duration_since(since) > self.upstream_grace {
            reasons.push(match *seen {
                Some(_) => format!(
                    "upstream disconnected for {}s (http.ready_upstream_grace_secs = {})",
                    now.duration_since(since).as_secs(),
                    self.upstream_grace.as_secs()
                ),
                None => format!(
                    "upstream never connected in {}s since start",
                    now.duration_since(since).as_secs()
                ),
            });
        }
        drop(seen);
        for feed in self.feed_reports() {
            if feed.state == "refused" {
                reasons.push(format!(
                    "ThingSpeak refused the subscription to channel {}'s feed",
                    feed.channel
                ));
            }
        }
        self.report(reasons)
    }

    /// Feeds the systemd watchdog only while this holds.
    pub fn is_progressing(&self) -> bool {
        self.heartbeat.age() <= MAX_HEARTBEAT_AGE
    }

    fn upstream_connected(&self) -> bool {
        self.metrics
            .registry()
            .gather()
            .iter()
            .filter(|family| family.name() == "tsgw_upstream_connected")
            .flat_map(|family| family.get_metric())
            .any(|m| m.get_gauge().get_value() > 0.0)
    }

    fn feed_reports(&self) -> Vec<FeedReport> {
        let Some(feeds) = &self.feeds else {
            return Vec::new();
        };
        feeds
            .status()
            .into_iter()
            .map(|s| FeedReport {
                channel: s.channel.get(),
                state: s.state,
                last_entry_id: s.last_entry_id,
            })
            .collect()
    }

    fn report(&self, reasons: Vec<String>) -> Report {
        Report {
            ok: reasons.is_empty(),
            reasons,
            queue_readings: self.metrics.queue_readings.get(),
            queue_bytes: self.metrics.queue_bytes.get(),
            upstream_connected: self.upstream_connected(),
            feeds: self.feed_reports(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_still_opening_is_named_not_a_stuck_writer() {
        let progress = OpenProgress::new();
        let health = Health::new(Heartbeat::new(), Metrics::new(), Duration::ZERO)
            .with_queue_opening(progress.clone());
        progress.start();
        progress.enter(OpenPhase::Counting);
        progress.add(1234);
        let r = health.liveness();
        assert!(!r.ok);
        assert!(
            r.reasons[0].starts_with("the queue is still opening: counting queued readings for"),
            "{:?}",
            r.reasons
        );
        assert!(
            r.reasons[0].ends_with("(1234 readings so far)"),
            "{:?}",
            r.reasons
        );
        progress.finish();
        assert!(health
            .liveness()
            .reasons
            .iter()
            .all(|r| !r.contains("opening")));
    }

    #[test]
    fn readiness_follows_the_upstream_gauge_after_the_grace_period() {
        let metrics = Metrics::new();
        let heartbeat = Heartbeat::new();
        heartbeat.beat();
        let health = Health::new(heartbeat, metrics.clone(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        let r = health.readiness();
        assert!(!r.ok);
        assert!(r.reasons[0].contains("never connected"), "{:?}", r.reasons);

        metrics
            .upstream_connected
            .with_label_values(&["main"])
            .set(1);
        assert!(health.readiness().ok);

        metrics
            .upstream_connected
            .with_label_values(&["main"])
            .set(0);
        std::thread::sleep(Duration::from_millis(5));
        let r = health.readiness();
        assert!(
            !r.ok && r.reasons[0].contains("disconnected"),
            "{:?}",
            r.reasons
        );
        assert!(health.liveness().ok);
    }
}
