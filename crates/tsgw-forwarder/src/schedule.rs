//! Per-channel interval bookkeeping: when each channel may be updated next.
//!
//! ThingSpeak silently drops an update that comes sooner than the licence's
//! interval after the previous one, so the forwarder never sends one. The
//! bookkeeping outlives connections (a reconnect does not reset it), and a
//! channel not yet updated by this process counts as updated at start-up, in
//! case a previous run updated it just before it stopped.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use thingspeak::ChannelId;
use tokio::time::Instant;

/// Extra time added to every interval: ThingSpeak measures the gap at its end,
/// where network jitter can bring two updates closer than we sent them.
pub const SAFETY_MARGIN: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Schedule {
    default: Duration,
    overrides: BTreeMap<ChannelId, Duration>,
    started: Instant,
    last: HashMap<ChannelId, Instant>,
}

impl Schedule {
    pub fn new(
        default: Duration,
        overrides: BTreeMap<ChannelId, Duration>,
        started: Instant,
    ) -> Self {
        Self {
            default,
            overrides,
            started,
            last: HashMap::new(),
        }
    }

    /// The configured interval of `channel`.
    pub fn interval(&self, channel: ChannelId) -> Duration {
        self.overrides
            .get(&channel)
            .copied()
            .unwrap_or(self.default)
    }

    /// The earliest time `channel` may be updated.
    pub fn due_at(&self, channel: ChannelId) -> Instant {
        let last = self.last.get(&channel).copied().unwrap_or(self.started);
        last + self.interval(channel) + SAFETY_MARGIN
    }

    pub fn is_due(&self, channel: ChannelId, now: Instant) -> bool {
        now >= self.due_at(channel)
    }

    /// Records that an update of `channel` may have reached ThingSpeak at `at`.
    /// Call it when the write is known (or when a connection died with the
    /// write in doubt): the later of the two times counts.
    pub fn record(&mut self, channel: ChannelId, at: Instant) {
        let entry = self.last.entry(channel).or_insert(at);
        if at > *entry {
            *entry = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    #[test]
    fn channels_wait_one_interval_after_start_and_after_each_update() {
        let start = Instant::now();
        let mut s = Schedule::new(Duration::from_secs(15), BTreeMap::new(), start);
        let due = start + Duration::from_secs(15) + SAFETY_MARGIN;
        assert_eq!(s.due_at(ch(1)), due);
        assert!(!s.is_due(ch(1), due - Duration::from_millis(1)));
        assert!(s.is_due(ch(1), due));

        let sent = start + Duration::from_secs(20);
        s.record(ch(1), sent);
        assert_eq!(
            s.due_at(ch(1)),
            sent + Duration::from_secs(15) + SAFETY_MARGIN
        );
        // Another channel is unaffected.
        assert_eq!(s.due_at(ch(2)), due);
    }

    #[test]
    fn overrides_apply_per_channel() {
        let start = Instant::now();
        let s = Schedule::new(
            Duration::from_secs(15),
            BTreeMap::from([(ch(7), Duration::from_secs(1))]),
            start,
        );
        assert_eq!(s.interval(ch(7)), Duration::from_secs(1));
        assert_eq!(s.interval(ch(8)), Duration::from_secs(15));
    }

    #[test]
    fn record_never_moves_backwards() {
        let start = Instant::now();
        let mut s = Schedule::new(Duration::from_secs(1), BTreeMap::new(), start);
        s.record(ch(1), start + Duration::from_secs(10));
        s.record(ch(1), start + Duration::from_secs(5));
        assert_eq!(
            s.due_at(ch(1)),
            start + Duration::from_secs(11) + SAFETY_MARGIN
        );
    }
}
