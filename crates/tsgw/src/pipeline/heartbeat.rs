//! Proof of progress, for the systemd watchdog and `/healthz`.
//!
//! The writer stamps the heartbeat after each batch it stored and on every idle
//! tick. A writer stuck inside the store (a hung disk, a deadlock) stops
//! stamping, the watchdog stops being fed, and systemd restarts the gateway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Heartbeat {
    origin: Instant,
    last_millis: Arc<AtomicU64>,
}

impl Heartbeat {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_millis: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_millis.store(ms, Ordering::Relaxed);
    }

    pub fn age(&self) -> Duration {
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_millis.load(Ordering::Relaxed)))
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_grows_until_the_next_beat() {
        let h = Heartbeat::new();
        h.beat();
        std::thread::sleep(Duration::from_millis(20));
        assert!(h.age() >= Duration::from_millis(20));
        h.beat();
        assert!(h.age() < Duration::from_millis(20));
    }
}
