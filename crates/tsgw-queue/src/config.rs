//! The `[queue]` section of the gateway's config.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::QueueError;

/// Where and how the durable queue stores readings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Directory of the store. Created if missing. A store that cannot be opened
    /// is renamed to `<dir>.corrupt-<unix-time>` and a fresh one started.
    pub dir: PathBuf,
    /// Bound of the stored readings, counted as encoded key + value bytes (about
    /// 50 bytes per numeric reading). When a push would exceed it, the oldest
    /// queued readings (across all channels) are dropped and counted.
    ///
    /// The files on disk are larger: sled is log-structured and does not give
    /// space back after a drain. Measured on x86-64: 100k queued readings
    /// (5 MB encoded) take about 20 MiB; a queue held full at a 1 MiB bound
    /// through 2 million pushes stayed between 9 and 14 MiB. Plan on about 4x
    /// this value plus 10 MiB.
    pub max_bytes: u64,
    /// Readings are durable (fsynced) at most this long after `push` returned,
    /// unless a waiting QoS 1 ack flushes sooner. Also how often the queue
    /// gauges are refreshed. 15 s by default (a free ThingSpeak channel's
    /// update interval): what a flush writes is a few 4 KiB pages whatever it
    /// holds, so at 1 reading/s 10 s wrote ~1.0 KiB per reading and 15 s
    /// ~0.9 KiB over an hour (`tsgw-bench wear`; the README's table).
    pub flush_interval_ms: u64,
    /// Memory sled may use for its page cache (its own default is 1 GiB).
    pub cache_capacity_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/tsgw/queue"),
            max_bytes: 64 * 1024 * 1024,
            flush_interval_ms: 15_000,
            cache_capacity_bytes: 4 * 1024 * 1024,
        }
    }
}

impl QueueConfig {
    /// Rejects values the queue cannot work with, naming the key.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |key: &'static str, reason: String| Err(QueueError::Config { key, reason });
        if self.dir.as_os_str().is_empty() {
            return bad("queue.dir", "must not be empty".into());
        }
        // Smaller than one reading makes every push fail.
        if self.max_bytes < 1024 {
            return bad(
                "queue.max_bytes",
                format!("{} is too small (minimum 1024)", self.max_bytes),
            );
        }
        if self.flush_interval_ms == 0 || self.flush_interval_ms > 3_600_000 {
            return bad(
                "queue.flush_interval_ms",
                format!(
                    "{} is out of range (1 to 3600000 ms)",
                    self.flush_interval_ms
                ),
            );
        }
        if self.cache_capacity_bytes < 64 * 1024 {
            return bad(
                "queue.cache_capacity_bytes",
                format!("{} is too small (minimum 65536)", self.cache_capacity_bytes),
            );
        }
        Ok(())
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_small() {
        let c = QueueConfig::default();
        c.validate().unwrap();
        assert_eq!(c.cache_capacity_bytes, 4 << 20);
        assert_eq!(c.max_bytes, 64 << 20);
    }

    #[test]
    fn bad_values_name_their_key() {
        let c = QueueConfig {
            flush_interval_ms: 0,
            ..QueueConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("queue.flush_interval_ms"), "{err}");
        let c = QueueConfig {
            max_bytes: 10,
            ..QueueConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("queue.max_bytes"));
    }
}
