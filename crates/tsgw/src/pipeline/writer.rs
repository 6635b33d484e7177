//! Moves readings from the sources' channel into the durable queue, in batches.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{error, info};
use tsgw_core::throttle::LogThrottle;
use tsgw_core::{Metrics, Reading};
use tsgw_queue::DurableQueue;

use super::heartbeat::Heartbeat;

/// Readings written in one sled batch at most. Larger batches amortise the
/// write; this bound keeps one batch's memory and latency small.
const MAX_BATCH: usize = 512;

/// How often an idle writer proves it is alive.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Runs until every sender is dropped (the sources stopped) and the channel is
/// drained, so a clean shutdown stores everything the sources produced.
pub async fn run(
    mut readings: mpsc::Receiver<Reading>,
    queue: DurableQueue,
    metrics: Metrics,
    heartbeat: Heartbeat,
) {
    let throttle = LogThrottle::new(Duration::from_secs(10));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        heartbeat.beat();
        let received = tokio::select! {
            n = readings.recv_many(&mut batch, MAX_BATCH) => n,
            _ = tokio::time::sleep(IDLE_TICK) => continue,
        };
        if received == 0 {
            info!("all sources stopped; queue writer done");
            return;
        }
        if let Err(e) = queue.push(&batch) {
            // The disk is full or failing. The readings cannot be kept; say so
            // loudly (but not once per batch) and count every one.
            metrics
                .queue_dropped_total
                .with_label_values(&["write_error"])
                .inc_by(batch.len() as u64);
            if let Some(suppressed) = throttle.check("push") {
                error!(error = %e, lost = batch.len(), suppressed, "cannot store readings in the queue; they are dropped");
            }
        }
        batch.clear();
    }
}
