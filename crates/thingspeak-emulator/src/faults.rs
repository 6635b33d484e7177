//! Injected faults: refused connections, silently lost publishes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How a refused connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseMode {
    /// Answer the CONNECT with CONNACK 3 (server unavailable).
    #[default]
    ServerUnavailable,
    /// Close the transport without answering.
    Close,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    refuse: Mutex<Option<(Instant, RefuseMode)>>,
    drop_next: AtomicU64,
    /// Probability in [0, 1] as f64 bits, so reads need no lock.
    drop_probability_bits: AtomicU64,
}

/// The active faults, as reported by the inspection API.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FaultStatus {
    pub refuse_remaining_ms: u64,
    pub refuse_mode: Option<RefuseMode>,
    pub drop_next_publishes: u64,
    pub drop_probability: f64,
}

impl Faults {
    pub(crate) fn refuse_for(&self, d: Duration, mode: RefuseMode) {
        let until = Instant::now() + d;
        *self.refuse.lock().unwrap_or_else(|p| p.into_inner()) = Some((until, mode));
    }

    /// The refusal in force now, if any.
    pub(crate) fn refusing(&self) -> Option<RefuseMode> {
        let guard = self.refuse.lock().unwrap_or_else(|p| p.into_inner());
        match *guard {
            Some((until, mode)) if Instant::now() < until => Some(mode),
            _ => None,
        }
    }

    pub(crate) fn drop_next(&self, n: u64) {
        self.drop_next.store(n, Ordering::Relaxed);
    }

    pub(crate) fn set_drop_probability(&self, p: f64) {
        let p = if p.is_finite() {
            p.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.drop_probability_bits
            .store(p.to_bits(), Ordering::Relaxed);
    }

    /// Decides whether this otherwise valid publish is silently lost.
    pub(crate) fn take_publish_drop(&self) -> bool {
        let took = self
            .drop_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if took {
            return true;
        }
        let p = f64::from_bits(self.drop_probability_bits.load(Ordering::Relaxed));
        p > 0.0 && rand::thread_rng().gen_bool(p)
    }

    pub(crate) fn clear(&self) {
        *self.refuse.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.drop_next(0);
        self.set_drop_probability(0.0);
    }

    pub(crate) fn status(&self) -> FaultStatus {
        let guard = self.refuse.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (remaining, mode) = match *guard {
            Some((until, mode)) if now < until => (until - now, Some(mode)),
            _ => (Duration::ZERO, None),
        };
        FaultStatus {
            refuse_remaining_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
            refuse_mode: mode,
            drop_next_publishes: self.drop_next.load(Ordering::Relaxed),
            drop_probability: f64::from_bits(self.drop_probability_bits.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_next_counts_down() {
        let f = Faults::default();
        f.drop_next(2);
        assert!(f.take_publish_drop());
        assert!(f.take_publish_drop());
        assert!(!f.take_publish_drop());
    }

    #[test]
    fn probability_one_drops_everything_and_clear_resets() {
        let f = Faults::default();
        f.set_drop_probability(1.0);
        assert!((0..20).all(|_| f.take_publish_drop()));
        f.clear();
        assert!(!f.take_publish_drop());
    }

    #[test]
    fn refusal_expires() {
        let f = Faults::default();
        f.refuse_for(Duration::from_secs(60), RefuseMode::Close);
        assert_eq!(f.refusing(), Some(RefuseMode::Close));
        f.refuse_for(Duration::ZERO, RefuseMode::Close);
        assert_eq!(f.refusing(), None);
    }
}
