//! Rate limiting for the "queue full" warning: a full queue drops on every push,
//! and one log line per push would flood the journal (and wear the SD card).

use std::time::{Duration, Instant};

/// Accumulates drops and says when (and how many) to report.
#[derive(Debug)]
pub struct DropLog {
    every: Duration,
    last: Option<Instant>,
    pending: u64,
}

impl DropLog {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            pending: 0,
        }
    }

    /// Records `n` drops at `now`. Returns the number to report if a report is due:
    /// the first drop is reported at once, later ones at most once per period.
    pub fn record(&mut self, n: u64, now: Instant) -> Option<u64> {
        self.pending += n;
        let due = match self.last {
            None => true,
            Some(last) => now.saturating_duration_since(last) >= self.every,
        };
        if due && self.pending > 0 {
            self.last = Some(now);
            Some(std::mem::take(&mut self.pending))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_first_then_at_most_once_per_period_with_the_sum() {
        let t0 = Instant::now();
        let mut log = DropLog::new(Duration::from_secs(10));
        assert_eq!(log.record(3, t0), Some(3));
        assert_eq!(log.record(2, t0 + Duration::from_secs(1)), None);
        assert_eq!(log.record(4, t0 + Duration::from_secs(9)), None);
        assert_eq!(log.record(1, t0 + Duration::from_secs(10)), Some(7));
        assert_eq!(log.record(1, t0 + Duration::from_secs(11)), None);
    }
}
