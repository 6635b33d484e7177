//! Backfill: bulk calls for a channel's older windows, their outcome and
//! backoff, the backlog policies (`bulk`, `mqtt`, `newest`) and backlog progress.

use std::time::Duration;

use chrono::{DateTime, Utc};
use thingspeak::{BulkEntry, ChannelId};
use tokio::time::Instant;
use tsgw_core::QueueKey;

use crate::batch::{Group, Policies};
use crate::config::Backfill;
use crate::progress::Backlog;
use crate::rest::BulkResult;

use super::send::{window_batch, PEEK_LIMIT};
use super::{unix_seconds, Forwarder};

/// Longest wait after HTTP 429 before the next bulk call.
pub(super) const MAX_BULK_BACKOFF: Duration = Duration::from_secs(300);

/// At most one "bulk call failed" warning per channel this often (a 10-minute
/// outage logged 120 of them for 3 channels before).
pub(super) const BULK_FAILURE_LOG_EVERY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub(super) struct BulkState {
    pub(super) next_at: Instant,
    pub(super) busy: bool,
    pub(super) backoff: Duration,
    /// A call was refused for good (bad key...): the channel uses MQTT only.
    pub(super) broken: bool,
}

/// The end of a bulk call, reported by its task.
pub(super) struct BulkDone {
    pub(super) channel: ChannelId,
    pub(super) covered: Vec<QueueKey>,
    pub(super) created_at: Vec<DateTime<Utc>>,
    pub(super) result: BulkResult,
}

impl Forwarder {
    pub(super) fn on_bulk_done(&mut self, done: BulkDone) {
        let channel = done.channel;
        let label = channel.to_string();
        let now = Instant::now();
        let interval = Duration::from_secs_f64(self.config.bulk_interval_secs);
        self.next_check.clear();
        let state = self.bulk_state.entry(channel).or_insert(BulkState {
            next_at: now,
            busy: false,
            backoff: interval,
            broken: false,
        });
        state.busy = false;
        match done.result {
            BulkResult::Accepted => {
                state.next_at = now + interval;
                state.backoff = interval;
                // ThingSpeak counts REST writes against the channel's rate too.
                self.schedule.record(channel, now);
                let unix_now = unix_seconds(Utc::now());
                self.metrics
                    .channel_last_sent_timestamp_seconds
                    .with_label_values(&[&label])
                    .set(unix_now);
                self.metrics
                    .channel_last_confirmed_timestamp_seconds
                    .with_label_values(&[&label])
                    .set(unix_now);
                let n = done.created_at.len() as u64;
                self.metrics
                    .updates_sent_total
                    .with_label_values(&[&label])
                    .inc_by(n);
                self.metrics
                    .updates_confirmed_total
                    .with_label_values(&[&label])
                    .inc_by(n);
                tracing::info!(%channel, updates = n, readings = done.covered.len(), "backlog written by a bulk call");
                match self.store.remove(&done.covered) {
                    Ok(()) => self.mark_used(channel, done.created_at),
                    // A repeat is harmless: ThingSpeak skips existing created_at.
                    Err(e) => {
                        tracing::error!(%channel, error = %e, "could not remove backfilled readings")
                    }
                }
            }
            BulkResult::TooFrequent => {
                state.backoff = (state.backoff * 2).min(MAX_BULK_BACKOFF);
                state.next_at = now + state.backoff;
                tracing::warn!(
                    %channel,
                    retry_in_secs = state.backoff.as_secs(),
                    "bulk call answered 429 (too frequent); backing off"
                );
            }
            BulkResult::Refused { status, body } => {
                state.broken = true;
                tracing::error!(
                    %channel,
                    status,
                    answer = %body.chars().take(200).collect::<String>(),
                    "bulk call refused: check upstream.channels.{channel}.write_key; this channel's \
                     backlog now goes over MQTT"
                );
            }
            BulkResult::Failed(message) => {
                state.next_at = now + interval;
                if let Some(suppressed) = self.bulk_failure_log.check(&label) {
                    tracing::warn!(
                        %channel,
                        error = %message,
                        failed_since_last_warning = suppressed,
                        retry_every_secs = interval.as_secs_f64(),
                        "bulk call failed; retrying"
                    );
                }
            }
        }
    }

    /// What waits behind the channel's newest closed window. Past the
    /// readings looked at in one pass, the queue's count gives the readings
    /// and the windows are extrapolated from the readings per window seen.
    pub(super) fn backlog(
        &self,
        channel: ChannelId,
        queued: &[tsgw_core::Queued],
        closed: &[&Group],
    ) -> Result<Backlog, tsgw_core::StoreError> {
        let Some((_, older)) = closed.split_last() else {
            return Ok(Backlog {
                windows: 0,
                readings: 0,
            });
        };
        let mut windows = older.len() as u64;
        let seen: u64 = older.iter().map(|g| g.readings.len() as u64).sum();
        let mut readings = seen;
        if queued.len() >= PEEK_LIMIT {
            let unseen = self
                .store
                .len_of(channel)?
                .saturating_sub(queued.len() as u64);
            readings += unseen;
            if seen > 0 {
                windows += (unseen * windows).div_ceil(seen);
            }
        }
        Ok(Backlog { windows, readings })
    }

    /// The backfill policy in force for `channel`: bulk needs a write key and a
    /// bulk path that was not refused.
    pub(super) fn backfill_policy(&mut self, channel: ChannelId) -> Backfill {
        match self.config.backfill {
            Backfill::Bulk => {
                let usable = self.bulk.is_some()
                    && self.config.write_key(channel).is_some()
                    && !self.bulk_state.get(&channel).is_some_and(|b| b.broken);
                if usable {
                    Backfill::Bulk
                } else {
                    if self.no_key_reported.insert(channel) {
                        tracing::info!(
                            %channel,
                            "no upstream.channels.{channel}.write_key: a backlog of this channel is \
                             sent over MQTT (backfill = \"mqtt\")"
                        );
                    }
                    Backfill::Mqtt
                }
            }
            other => other,
        }
    }

    /// Removes the readings of windows the `newest` policy gives up on.
    pub(super) fn drop_windows(
        &mut self,
        channel: ChannelId,
        windows: &[&Group],
    ) -> Result<(), tsgw_core::StoreError> {
        if windows.is_empty() {
            return Ok(());
        }
        let keys: Vec<QueueKey> = windows
            .iter()
            .flat_map(|g| g.readings.iter().map(|q| q.key))
            .collect();
        self.store.remove(&keys)?;
        self.metrics
            .updates_dropped_total
            .with_label_values(&[&channel.to_string(), "backfill_newest"])
            .inc_by(windows.len() as u64);
        tracing::warn!(
            %channel,
            windows = windows.len(),
            readings = keys.len(),
            "backfill = \"newest\": dropped windows older than the newest"
        );
        Ok(())
    }

    pub(super) fn start_bulk(
        &mut self,
        channel: ChannelId,
        windows: &[&Group],
        policies: &Policies,
    ) {
        let (Some(client), Some(key)) = (self.bulk.clone(), self.config.write_key(channel)) else {
            return;
        };
        let mut covered = Vec::new();
        let mut created_at = Vec::new();
        let mut entries = Vec::new();
        for g in windows {
            let b = window_batch(channel, &[g], policies);
            if b.is_empty() {
                continue;
            }
            entries.push(BulkEntry::from_update(&b.update, g.created_at));
            covered.extend(b.covered);
            created_at.push(g.created_at);
        }
        if entries.is_empty() {
            return;
        }
        let interval = Duration::from_secs_f64(self.config.bulk_interval_secs);
        let state = self.bulk_state.entry(channel).or_insert(BulkState {
            next_at: Instant::now(),
            busy: false,
            backoff: interval,
            broken: false,
        });
        state.busy = true;
        tracing::info!(%channel, updates = entries.len(), "backfilling older windows with a bulk call");
        let tx = self.bulk_tx.clone();
        tokio::spawn(async move {
            let result = client.post(channel, &key, entries).await;
            let _ = tx
                .send(BulkDone {
                    channel,
                    covered,
                    created_at,
                    result,
                })
                .await;
        });
    }
}
