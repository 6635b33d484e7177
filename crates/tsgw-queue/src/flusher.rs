//! The background task that makes pushed readings durable.
//!
//! sled's own periodic flush is off (see `open`): this task fsyncs every
//! `flush_interval_ms`, but only when something was written since the last
//! flush, so an idle gateway does not touch the SD card. Each tick also
//! refreshes `queue_oldest_age_seconds`, which grows while nothing happens,
//! and, after a storage error, tries to reopen the store.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use crate::queue::DurableQueue;
use crate::swap::RETURN_SPACE_ABOVE;

/// How often an empty queue checks whether its files should be given back
/// (a directory listing; see `swap`).
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(10);

impl DurableQueue {
    /// Flushes every `flush_interval_ms` while dirty and keeps the gauges
    /// current; on `shutdown`, flushes once more and ends. Must be called from
    /// within a tokio runtime.
    pub fn spawn_flusher(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let queue = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(queue.inner.config.flush_interval());
            // After a slow flush (SD card stall), wait a full interval again
            // instead of flushing back-to-back to catch up.
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut last_space_check = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if queue.has_failed() {
                    // sled stays failed after an I/O error: reopen (retried each tick).
                    queue.reopen_if_failed();
                } else if queue.inner.dirty.load(Ordering::Acquire) {
                    if let Err(e) = queue.flush().await {
                        error!(error = %e, "queue flush failed; retrying next interval");
                    }
                }
                if last_space_check.elapsed() >= SPACE_CHECK_EVERY {
                    last_space_check = Instant::now();
                    if let Err(e) = queue.return_space_if_drained(RETURN_SPACE_ABOVE) {
                        error!(error = %e, "moving the drained queue to a fresh store failed");
                    }
                }
                queue.refresh_age_gauge();
            }
            match queue.flush().await {
                Ok(()) => debug!("queue flushed at shutdown"),
                Err(e) => error!(error = %e, "final queue flush at shutdown failed"),
            }
            queue.refresh_age_gauge();
        })
    }
}
