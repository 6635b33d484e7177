//! Moves readings from the sources into the durable queue, in batches, and
//! tells the sources that wait for it when their readings are on disk.
//!
//! ```text
//! serial, Modbus ──► mpsc<Reading> ────┐
//!                                      ├──► writer: queue.push ──► committer: queue.flush (fsync) ──► acks
//! MQTT front ──► mpsc<IngestBatch> ────┘
//! ```
//! Group commit: the committer flushes as soon as an ack waits, and one fsync
//! covers every batch that arrived meanwhile. The writer keeps pushing while
//! a flush runs. Batches without an ack (QoS 0, polled devices) are made
//! durable by the queue's own flush interval.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use tsgw_core::throttle::LogThrottle;
use tsgw_core::{DurableAck, IngestBatch, Metrics, Reading};
use tsgw_queue::DurableQueue;

use super::heartbeat::Heartbeat;
use crate::ops::status::recent::RecentReadings;

/// Readings written in one sled batch at most. Larger batches amortise the
/// write; this bound keeps one batch's memory and latency small.
const MAX_BATCH: usize = 512;

/// MQTT batches taken from the channel at once (each is one device read:
/// up to 16 KiB of publishes).
const MAX_MQTT_BATCHES: usize = 16;

/// Groups of acks waiting for the committer. When it is this far behind, the
/// writer waits, and so, through the bounded channels, do the devices.
const COMMIT_QUEUE: usize = 64;

/// How often an idle writer proves it is alive.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// A test hook, never set in production: delays every push by this many
/// milliseconds, to show that a slow disk makes devices wait instead of
/// losing readings (tests/e2e/local_broker.rs). Not `TSGW_...`: those are
/// config keys.
const TEST_DELAY_ENV: &str = "TESTHOOK_TSGW_WRITER_DELAY_MS";

/// The receiving ends of the sources' channels.
pub struct Inputs {
    pub polled: mpsc::Receiver<Reading>,
    pub mqtt: mpsc::Receiver<IngestBatch>,
}

/// Runs until every sender of both channels is dropped (the sources stopped)
/// and both are drained, so a clean shutdown stores everything the sources
/// produced; then waits for the last acks' fsync.
pub async fn run(
    inputs: Inputs,
    queue: DurableQueue,
    metrics: Metrics,
    heartbeat: Heartbeat,
    recent: RecentReadings,
) {
    let Inputs {
        mut polled,
        mut mqtt,
    } = inputs;
    let (commits, commit_rx) = mpsc::channel(COMMIT_QUEUE);
    let committer = spawn_committer(commit_rx, queue.clone(), metrics.clone());
    let delay = test_delay();
    let throttle = LogThrottle::new(Duration::from_secs(10));
    let mut readings = Vec::with_capacity(MAX_BATCH);
    let mut batches = Vec::with_capacity(MAX_MQTT_BATCHES);
    // Which MQTT account published which of `readings`, for the status page.
    let mut publishers: Vec<(Arc<str>, Range<usize>)> = Vec::with_capacity(MAX_MQTT_BATCHES);
    let mut acks: Vec<DurableAck> = Vec::new();
    let (mut polled_open, mut mqtt_open) = (true, true);
    while polled_open || mqtt_open {
        heartbeat.beat();
        tokio::select! {
            n = polled.recv_many(&mut readings, MAX_BATCH), if polled_open => {
                polled_open = n > 0;
            }
            n = mqtt.recv_many(&mut batches, MAX_MQTT_BATCHES), if mqtt_open => {
                mqtt_open = n > 0;
                for batch in batches.drain(..) {
                    let start = readings.len();
                    readings.extend(batch.readings);
                    if let Some(account) = batch.publisher {
                        publishers.push((account, start..readings.len()));
                    }
                    acks.extend(batch.durable);
                }
            }
            _ = tokio::time::sleep(IDLE_TICK) => continue,
        }
        if readings.is_empty() && acks.is_empty() {
            continue;
        }
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let stored = match queue.push(&readings) {
            Ok(()) => true,
            Err(e) => {
                // The disk is full or failing. The readings cannot be kept;
                // say so loudly (but not once per batch) and count every one.
                // Devices waiting for an ack do not get one: they resend.
                metrics
                    .queue_dropped_total
                    .with_label_values(&["write_error"])
                    .inc_by(readings.len() as u64);
                if let Some(suppressed) = throttle.check("push") {
                    error!(error = %e, lost = readings.len(), suppressed, "cannot store readings in the queue; they are dropped");
                }
                false
            }
        };
        if stored {
            recent.observe_published(&readings, &publishers);
        }
        readings.clear();
        publishers.clear();
        if acks.is_empty() {
            continue;
        }
        let group = std::mem::take(&mut acks);
        if !stored {
            group.into_iter().for_each(|ack| ack.resolve(false));
        } else if let Err(unsent) = commits.send(group).await {
            unsent.0.into_iter().for_each(|ack| ack.resolve(false));
        }
    }
    info!("all sources stopped; queue writer done");
    drop(commits);
    let _ = committer.await;
}

/// Flushes the queue whenever acks wait, then resolves them all.
fn spawn_committer(
    mut waiting: mpsc::Receiver<Vec<DurableAck>>,
    queue: DurableQueue,
    metrics: Metrics,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut groups = Vec::new();
        while waiting.recv_many(&mut groups, COMMIT_QUEUE).await > 0 {
            // Every group here was pushed before this flush starts, so the
            // flush covers all of them.
            let flushed = queue.flush().await;
            metrics.queue_group_commits_total.inc();
            if let Err(e) = &flushed {
                warn!(error = %e, "queue flush for waiting acks failed; those devices get no ack and will resend");
            }
            for ack in groups.drain(..).flatten() {
                ack.resolve(flushed.is_ok());
            }
        }
    })
}

fn test_delay() -> Option<Duration> {
    let ms: u64 = std::env::var(TEST_DELAY_ENV).ok()?.parse().ok()?;
    warn!(
        delay_ms = ms,
        "{TEST_DELAY_ENV} is set: every queue write is delayed (a test hook; unset it in production)"
    );
    Some(Duration::from_millis(ms))
}
