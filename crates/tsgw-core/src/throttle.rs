//! Rate-limited logging for per-message problems.
//!
//! A misconfigured device can send thousands of bad messages a second; logging
//! each would flood the journal and wear the SD card. Metrics count every one;
//! logs say it at most once per interval per key, with how many were suppressed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Remembers when each key was last logged.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    /// key → (last logged, suppressed since then). Bounded: see `MAX_KEYS`.
    state: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Keys are often topics chosen by devices; cap the map so hostile input
/// cannot grow it without bound.
const MAX_KEYS: usize = 1024;

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Returns `Some(suppressed)` when the caller should log now (and how many
    /// occurrences were not logged since the last time), `None` to stay quiet.
    pub fn check(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, suppressed)) = state.get_mut(key) {
            if now.duration_since(*last) < self.interval {
                *suppressed += 1;
                return None;
            }
            let n = *suppressed;
            *last = now;
            *suppressed = 0;
            return Some(n);
        }
        if state.len() >= MAX_KEYS {
            let interval = self.interval;
            state.retain(|_, (last, _)| now.duration_since(*last) < interval);
            if state.len() >= MAX_KEYS {
                // Still full of fresh keys: log under one shared key instead.
                return self.check_overflow(&mut state, now);
            }
        }
        state.insert(key.to_owned(), (now, 0));
        Some(0)
    }

    fn check_overflow(
        &self,
        state: &mut HashMap<String, (Instant, u64)>,
        now: Instant,
    ) -> Option<u64> {
        const OVERFLOW: &str = "\u{0}overflow";
        match state.get_mut(OVERFLOW) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                state.insert(OVERFLOW.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_interval_and_counts_the_rest() {
        let t = LogThrottle::new(Duration::from_millis(50));
        assert_eq!(t.check("a"), Some(0));
        assert_eq!(t.check("a"), None);
        assert_eq!(t.check("a"), None);
        assert_eq!(t.check("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(t.check("a"), Some(2));
    }

    #[test]
    fn key_count_is_bounded() {
        let t = LogThrottle::new(Duration::from_secs(60));
        for i in 0..5000 {
            t.check(&format!("topic/{i}"));
        }
        assert!(t.state.lock().unwrap().len() <= MAX_KEYS + 1);
    }
}
