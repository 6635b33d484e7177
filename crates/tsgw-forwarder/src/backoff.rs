//! Reconnect delays: exponential from a minimum to a cap, with jitter so many
//! gateways cut off together do not reconnect in lockstep.

use std::time::Duration;

/// Exponential backoff state. Pure: the caller supplies the randomness.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt, and one step further up the curve.
    /// `jitter` is a uniform random number in `[0, 1)`: the delay lies in
    /// `[base / 2, base]` (never under `min`), base = min · 2^attempt capped at max.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let base = self.base();
        self.attempt = self.attempt.saturating_add(1);
        Self::jittered(base, self.min, jitter)
    }

    /// The longest delay (the cap, jittered): used after a refusal that will
    /// not go away by retrying quickly (bad credentials, not authorised).
    pub fn max_delay(&mut self, jitter: f64) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        Self::jittered(self.max, self.min.max(self.max / 2), jitter)
    }

    /// Back to the minimum, after a connection proved stable.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn base(&self) -> Duration {
        // 2^attempt overflows quickly; the cap is reached long before 2^32.
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.min.saturating_mul(factor).min(self.max)
    }

    fn jittered(base: Duration, floor: Duration, jitter: f64) -> Duration {
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        base.mul_f64(0.5 + 0.5 * jitter)
            .max(floor)
            .min(base.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(secs(1.0), secs(60.0));
        let delays: Vec<Duration> = (0..9).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(
            delays,
            [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0].map(secs)
        );
    }

    #[test]
    fn jitter_stays_between_half_and_full_and_above_min() {
        let mut b = Backoff::new(secs(1.0), secs(60.0));
        assert_eq!(b.next_delay(0.0), secs(1.0), "never below min");
        assert_eq!(b.next_delay(0.0), secs(1.0));
        assert_eq!(b.next_delay(0.5), secs(3.0));
        for _ in 0..3 {
            b.next_delay(0.0);
        }
        // From here the base is the 60 s cap.
        for _ in 0..20 {
            let d = b.next_delay(0.0);
            assert!(d >= secs(30.0) && d <= secs(60.0), "{d:?}");
        }
    }

    #[test]
    fn reset_returns_to_min() {
        let mut b = Backoff::new(secs(2.0), secs(10.0));
        for _ in 0..5 {
            b.next_delay(1.0);
        }
        b.reset();
        assert_eq!(b.next_delay(1.0), secs(2.0));
    }

    #[test]
    fn max_delay_is_slow_and_bad_jitter_is_harmless() {
        let mut b = Backoff::new(secs(1.0), secs(60.0));
        let d = b.max_delay(0.0);
        assert!(d >= secs(30.0) && d <= secs(60.0), "{d:?}");
        assert_eq!(b.next_delay(f64::NAN), secs(1.0));
        let mut b = Backoff::new(secs(1.0), secs(1.0));
        assert_eq!(b.max_delay(0.3), secs(1.0));
        for _ in 0..100 {
            assert_eq!(b.next_delay(1.0), secs(1.0));
        }
    }
}
