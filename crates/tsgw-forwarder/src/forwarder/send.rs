//! Sending and scheduling windows: what a channel's queued readings become
//! (one update per closed window, or a bulk call for a backlog), and when the
//! update may be handed to the connection (subscription, rate-limit slot,
//! idle renewal).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::QoS;
use thingspeak::{ChannelId, Topic};
use tokio::time::Instant;
use tsgw_core::QueueKey;

use crate::batch::{aggregate, group, Batch, Group, Policies, Rejected};
use crate::config::{Auth, Backfill};

use super::confirm::{Pending, Stage, Sub};
use super::doubt::Verdict;
use super::{unix_seconds, Conn, Forwarder, InFlight, IDLE, STORE_RETRY};

/// Most readings looked at per channel and pass. More wait for later passes.
pub(super) const PEEK_LIMIT: usize = 10_000;

/// The field and value of an update that sets exactly one field and nothing else.
pub(super) fn single_field(
    update: &thingspeak::ChannelUpdate,
) -> Option<(thingspeak::Field, &str)> {
    let mut values = update.values.iter();
    match (values.next(), values.next()) {
        (Some((thingspeak::Target::Field(f), v)), None) => Some((*f, v.as_str())),
        _ => None,
    }
}

/// One update from the readings of `windows` (consecutive, oldest first),
/// stamped with the first window's `created_at`.
pub(super) fn window_batch(channel: ChannelId, windows: &[&Group], policies: &Policies) -> Batch {
    let created_at = windows
        .first()
        .map_or(DateTime::UNIX_EPOCH, |g| g.created_at);
    let readings: Vec<_> = windows.iter().flat_map(|g| g.readings.iter()).collect();
    aggregate(channel, created_at, &readings, policies)
}

impl Forwarder {
    pub(super) fn on_written(&mut self, generation: u64) {
        let Some(in_flight) = self.in_flight.take() else {
            tracing::warn!("publish written that the forwarder did not issue; ignoring");
            return;
        };
        if in_flight.generation != generation {
            self.in_flight = Some(in_flight);
            return;
        }
        let now = Instant::now();
        if let Conn::Up { last_publish, .. } = &mut self.conn {
            *last_publish = now;
        }
        self.written(in_flight.channel, generation, now);
    }

    /// The update of `channel` was written to the connection.
    pub(super) fn written(&mut self, channel: ChannelId, generation: u64, now: Instant) {
        self.next_check.remove(&channel);
        self.write_seq += 1;
        let seq = self.write_seq;
        // A later publish written: the connection outlived the earlier ones.
        self.settle_survivors(None, true, now);
        self.poison_note_write(channel, generation, now);
        self.schedule.record(channel, now);
        let label = channel.to_string();
        self.metrics
            .updates_sent_total
            .with_label_values(&[&label])
            .inc();
        let unix_now = unix_seconds(Utc::now());
        self.metrics
            .upstream_last_publish_timestamp_seconds
            .set(unix_now);
        self.metrics
            .channel_last_sent_timestamp_seconds
            .with_label_values(&[&label])
            .set(unix_now);
        let confirms = self.confirms(channel);
        let timeout = self.confirm_timeout;
        let Some(p) = self.pending.get_mut(&channel) else {
            // Confirmed by an echo that overtook the write report.
            return;
        };
        if p.writes > 0 {
            self.metrics
                .updates_retried_total
                .with_label_values(&[&label])
                .inc();
        }
        p.writes += 1;
        p.written = Some((generation, seq));
        tracing::debug!(
            %channel,
            readings = p.batch.covered.len(),
            values = p.batch.update.values.len(),
            created_at = ?p.batch.created_at(),
            "update written"
        );
        if confirms {
            p.stage = Stage::AwaitEcho {
                until: now + timeout,
            };
        } else {
            // "Written" counts, but not yet: ThingSpeak closes the
            // connection right after a publish it refuses (a channel the
            // device may not write), and such an update must stay queued.
            // It waits aside, its readings and created_at held, and the
            // channel goes on; see `settle_survivors`.
            let Some(p) = self.pending.remove(&channel) else {
                return;
            };
            self.next_check.remove(&channel);
            self.set_aside(channel, p, Some(now));
        }
    }

    /// Moves one channel forward; returns when it needs looking at again.
    pub(super) fn advance(
        &mut self,
        channel: ChannelId,
        now: Instant,
    ) -> Result<Instant, tsgw_core::StoreError> {
        // Writes that outlive their close-right-after period count then,
        // whatever else the channel waits for.
        let survive_at = self.settle_survivors(Some(channel), false, now);
        let at = self.advance_channel(channel, now)?;
        Ok(survive_at.map_or(at, |s| s.min(at)))
    }

    fn advance_channel(
        &mut self,
        channel: ChannelId,
        now: Instant,
    ) -> Result<Instant, tsgw_core::StoreError> {
        let idle = now + IDLE;
        if let Some(until) = self.parked_until(channel, now) {
            return Ok(until);
        }
        if let Some(p) = self.pending.get(&channel) {
            if p.stage == Stage::Ready && p.writes == 0 && !p.doubt {
                // Never sent: decide afresh (newer windows may have closed,
                // a bulk call may have become due).
                self.pending.remove(&channel);
            } else {
                return Ok(self.advance_pending(channel, now));
            }
        }
        if let Some(batch) = self.take_unsent_doubt(channel) {
            // Its evidence was cut short by a lost connection: resent, with
            // the same created_at, before anything newer.
            let mut p = Pending::new(batch, true);
            p.doubt = true;
            self.pending.insert(channel, p);
            return Ok(self.advance_pending(channel, now));
        }
        if self.bulk_state.get(&channel).is_some_and(|b| b.busy) {
            // Its end is an event, which looks at the channel again.
            return Ok(idle);
        }
        let utc_now = Utc::now();
        let mut queued = self.store.peek(channel, PEEK_LIMIT)?;
        let mut used = self.used.get(&channel).cloned().unwrap_or_default();
        if let Some(evidence) = self.evidence.get(&channel) {
            // Readings of doubts wait for their evidence; late readings of
            // their windows go to the next one.
            let (keys, times) = evidence.held();
            queued.retain(|q| !keys.contains(&q.key));
            used.extend(times);
        }
        let (groups, rejected) = group(
            channel,
            &queued,
            self.schedule.interval(channel),
            &used,
            utc_now,
        );
        self.drop_rejected(channel, &rejected)?;
        self.show_next_window(channel, groups.first(), now, utc_now);
        let closed: Vec<&Group> = groups.iter().filter(|g| g.is_closed(utc_now)).collect();
        // A window not yet sent is decided afresh when the next one closes
        // (a newer window may go first, a bulk call may take it).
        let next_close = groups
            .iter()
            .find(|g| !g.is_closed(utc_now))
            .map_or(idle, |g| {
                now + (g.closes_at - utc_now).to_std().unwrap_or(Duration::ZERO)
            });
        let left = self.backlog(channel, &queued, &closed)?;
        self.progress.observe(channel, left, now, &self.metrics);
        if closed.is_empty() {
            return Ok(match groups.first() {
                Some(g) => now + (g.closes_at - utc_now).to_std().unwrap_or(Duration::ZERO),
                None => idle,
            });
        }
        let policies = self.config.policies(channel);
        let batch = match self.backfill_policy(channel) {
            Backfill::Newest => {
                if let Some((newest, older)) = closed.split_last() {
                    self.drop_windows(channel, older)?;
                    Some(window_batch(channel, &[newest], &policies))
                } else {
                    None
                }
            }
            Backfill::Mqtt => {
                let n = self.config.downsample_after;
                let merge = if closed.len() > n {
                    closed.len().div_ceil(n)
                } else {
                    1
                };
                if merge > 1 {
                    tracing::info!(%channel, windows = closed.len(), merge, "backlog: merging old windows into one update");
                }
                let take = merge.min(closed.len());
                Some(window_batch(channel, &closed[..take], &policies))
            }
            Backfill::Bulk => {
                let bulk_due = self.bulk_state.get(&channel).map_or(
                    now >= self.started + Duration::from_secs_f64(self.config.bulk_interval_secs),
                    |b| now >= b.next_at,
                );
                // A bulk call takes one of the channel's update slots too:
                // ThingSpeak counts REST and MQTT writes together.
                if closed.len() > 1 && bulk_due && self.schedule.is_due(channel, now) {
                    let max = self.config.bulk_max_updates;
                    // For one older window the call takes the newest too:
                    // one slot for both, so the channel catches up (its
                    // slots are 100 ms longer than its windows).
                    let take = if closed.len() == 2 {
                        2
                    } else {
                        closed.len() - 1
                    };
                    let older = &closed[..take.min(max)];
                    self.start_bulk(channel, older, &policies);
                    return Ok(idle);
                }
                // One window waiting behind the newest is no backlog (a slot
                // came a little after its window closed): it goes first over
                // MQTT, in order, rather than wait for the next bulk call.
                let next = if closed.len() == 2 {
                    closed.first()
                } else {
                    closed.last()
                };
                next.map(|w| window_batch(channel, &[w], &policies))
            }
        };
        match batch {
            Some(batch) if !batch.is_empty() => match self.check_window(channel, &batch, now) {
                Verdict::Send { maybe_stored } => {
                    self.pending
                        .insert(channel, Pending::new(batch, maybe_stored));
                    let at = self.advance_pending(channel, now);
                    let unsent = self
                        .pending
                        .get(&channel)
                        .is_some_and(|p| p.stage == Stage::Ready && p.writes == 0);
                    Ok(if unsent { at.min(next_close) } else { at })
                }
                Verdict::Wait(until) => Ok(until.min(next_close)),
                Verdict::Settled => Ok(now),
            },
            _ => Ok(now + STORE_RETRY),
        }
    }

    /// Sets the channel's next-window gauge: when its oldest unsent window can
    /// go (closed, and the rate-limit slot free), 0 with nothing queued.
    pub(super) fn show_next_window(
        &self,
        channel: ChannelId,
        oldest: Option<&Group>,
        now: Instant,
        utc_now: DateTime<Utc>,
    ) {
        let at = oldest.map_or(0.0, |g| {
            let slot_in = self.schedule.due_at(channel).saturating_duration_since(now);
            let slot = utc_now + chrono::TimeDelta::from_std(slot_in).unwrap_or_default();
            unix_seconds(g.closes_at.max(slot))
        });
        self.metrics
            .channel_next_window_timestamp_seconds
            .with_label_values(&[&channel.to_string()])
            .set(at);
    }

    /// Publishes the ready update of `channel` when the connection, the
    /// subscription and the channel's interval allow.
    pub(super) fn try_publish(&mut self, channel: ChannelId, now: Instant) -> Instant {
        let idle = now + IDLE;
        let (generation, client, last_publish) = match &self.conn {
            Conn::Up {
                generation,
                client,
                last_publish,
                ..
            } => (*generation, client.clone(), *last_publish),
            // Connecting is an event that looks at every channel again.
            _ => return idle,
        };
        if self.in_flight.is_some() {
            // Its write report is an event that looks again.
            return idle;
        }
        if self.confirms(channel) {
            match self.subs.get(&channel) {
                // A window of the previous run waits (at most one confirm
                // timeout) for the newest entry the subscription delivers:
                // it may be that window, stored before the crash.
                Some(Sub::Granted { at, heard: false })
                    if self.pending.get(&channel).is_some_and(|p| p.maybe_stored)
                        && now < *at + self.confirm_timeout =>
                {
                    return *at + self.confirm_timeout;
                }
                Some(Sub::Granted { .. }) => {}
                // The SUBACK is an event that looks again.
                Some(Sub::Requested) => return idle,
                None => {
                    return if self.subscribe(channel) {
                        idle
                    } else {
                        now + STORE_RETRY
                    };
                }
            }
        }
        if !self.schedule.is_due(channel, now) {
            return self.schedule.due_at(channel);
        }
        if now.duration_since(last_publish) >= self.renew_idle_after {
            self.renew_connection(now);
            return now;
        }
        let key = match self.config.auth {
            Auth::Device => None,
            Auth::Legacy => match self.config.write_key(channel) {
                Some(k) => Some(k),
                None => {
                    if self.legacy_key_reported.insert(channel) {
                        tracing::error!(
                            %channel,
                            "legacy auth needs upstream.channels.\"{channel}\".write_key; \
                             this channel's readings stay queued"
                        );
                    }
                    return idle;
                }
            },
        };
        let Some(p) = self.pending.get_mut(&channel) else {
            return now;
        };
        // The topic may hold the write key: never log it.
        let (topic, payload) = match single_field(&p.batch.update) {
            Some((field, value)) if self.config.field_topics => (
                Topic::PublishField {
                    channel,
                    field,
                    key,
                }
                .to_string(),
                value.to_owned(),
            ),
            _ => (
                Topic::Publish { channel, key }.to_string(),
                p.batch.update.encode(),
            ),
        };
        match client.try_publish(topic, QoS::AtMostOnce, false, payload) {
            Ok(()) => {
                p.stage = Stage::Writing;
                self.in_flight = Some(InFlight {
                    generation,
                    channel,
                    issued: now,
                });
                idle
            }
            Err(e) => {
                // The event loop is gone or full; its driver reports why.
                tracing::warn!(%channel, error = %e, "could not hand the update to the connection");
                now + STORE_RETRY
            }
        }
    }

    /// Removes readings that can never be sent, counting and logging each.
    pub(super) fn drop_rejected(
        &self,
        channel: ChannelId,
        rejected: &[Rejected],
    ) -> Result<(), tsgw_core::StoreError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let keys: Vec<QueueKey> = rejected.iter().map(|r| r.key).collect();
        self.store.remove(&keys)?;
        for r in rejected {
            tracing::warn!(
                %channel,
                target = %r.target,
                seq = r.key.seq,
                "dropping reading: {}",
                r.detail
            );
            self.metrics
                .queue_dropped_total
                .with_label_values(&[r.reason])
                .inc();
        }
        Ok(())
    }
}
