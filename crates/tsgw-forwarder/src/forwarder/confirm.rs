//! Confirmation and in-doubt resolution: the outstanding update of each
//! channel, ThingSpeak's echo of it, the check by subscribing again, and what
//! an entry at the update's `created_at` means.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rumqttc::QoS;
use thingspeak::{ChannelId, EntryJson, Target, Topic};
use tokio::time::Instant;

use crate::batch::Batch;
use crate::config::Auth;

use super::doubt::same_entry;
use super::{unix_seconds, Conn, Forwarder, IDLE, STORE_RETRY};

/// Checks (subscribe again, wait for the channel's newest entry) that may find
/// no trace of an update before it is set aside as a doubt and the channel
/// goes on. A silently dropped publish fails one check, so this is only
/// reached when something else owns that timestamp (another writer), or on a
/// link that loses nearly everything. It never gets a fresh `created_at`:
/// having been written, ThingSpeak may hold it.
pub(super) const MAX_PROBES: u32 = 10;

/// `created_at` values remembered per channel (for late readings).
pub(super) const USED_MEMORY: usize = 4096;

/// Where the outstanding update of a channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// To be (re)sent at the channel's next slot.
    Ready,
    /// Handed to the connection, not yet written.
    Writing,
    /// Written; waiting for ThingSpeak to relay it back.
    AwaitEcho { until: Instant },
    /// Subscribed again to get the channel's newest entry; waiting for it.
    Probe { until: Instant },
    /// The connection died after (maybe) writing it: check after reconnecting.
    InDoubt,
}

pub(super) struct Pending {
    pub(super) batch: Batch,
    pub(super) stage: Stage,
    /// Times written to a connection.
    pub(super) writes: u32,
    /// Checks that found no trace of it.
    pub(super) probes: u32,
    /// An earlier write (of this run or the previous one) may have stored
    /// it: an unechoed resend makes it a doubt, and it never gets a fresh
    /// `created_at`.
    pub(super) maybe_stored: bool,
    /// Connection generation and write number of its last write.
    pub(super) written: Option<(u64, u64)>,
    /// A doubt sent again: kept until settled, never re-decided.
    pub(super) doubt: bool,
}

impl Pending {
    pub(super) fn new(batch: Batch, maybe_stored: bool) -> Self {
        Self {
            batch,
            stage: Stage::Ready,
            writes: 0,
            probes: 0,
            maybe_stored,
            written: None,
            doubt: false,
        }
    }
}

/// The connection's subscription of a channel's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sub {
    Requested,
    /// `heard`: the subscription delivered an entry (the channel's newest
    /// comes right after the grant, if the channel has one).
    Granted {
        at: Instant,
        heard: bool,
    },
}

/// Whether ThingSpeak's echo of a value is the value sent: the same text, or
/// the same number written differently (`21.50` for `21.5`), in case the
/// service normalises numbers.
pub(super) fn same_value(echoed: &str, sent: &str) -> bool {
    if echoed == sent {
        return true;
    }
    match (echoed.trim().parse::<f64>(), sent.trim().parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl Forwarder {
    pub(super) fn confirms(&self, channel: ChannelId) -> bool {
        self.config.confirm && !self.unconfirmable.contains(&channel)
    }

    /// The outstanding update of `channel` is delivered: its readings leave
    /// the store and its `created_at` is remembered as taken.
    pub(super) fn deliver(&mut self, channel: ChannelId, confirmed: bool) {
        let Some(p) = self.pending.remove(&channel) else {
            return;
        };
        self.deliver_batch(channel, &p.batch, confirmed);
        if confirmed {
            self.poison_cleared(channel);
            if let Some(written) = p.written {
                self.settle_doubts_before(channel, written);
            }
        }
    }

    /// The readings of `batch` leave the store and its `created_at` is
    /// remembered as taken.
    pub(super) fn deliver_batch(&mut self, channel: ChannelId, batch: &Batch, confirmed: bool) {
        self.next_check.remove(&channel);
        let label = channel.to_string();
        self.metrics
            .channel_last_confirmed_timestamp_seconds
            .with_label_values(&[&label])
            .set(unix_seconds(Utc::now()));
        // The next pass sets it again if more is queued (a channel with
        // nothing queued is not looked at).
        self.metrics
            .channel_next_window_timestamp_seconds
            .with_label_values(&[&label])
            .set(0.0);
        if confirmed {
            self.metrics
                .updates_confirmed_total
                .with_label_values(&[&label])
                .inc();
        }
        match self.store.remove(&batch.covered) {
            Ok(()) => {
                if let Some(t) = batch.created_at() {
                    self.mark_used(channel, [t]);
                }
            }
            // The readings stay and form the same window again; ThingSpeak
            // rejects its created_at as a duplicate and the check finds it.
            Err(e) => tracing::error!(%channel, error = %e, "could not remove delivered readings"),
        }
    }

    pub(super) fn mark_used(
        &mut self,
        channel: ChannelId,
        times: impl IntoIterator<Item = DateTime<Utc>>,
    ) {
        let used = self.used.entry(channel).or_default();
        used.extend(times);
        while used.len() > USED_MEMORY {
            used.pop_first();
        }
    }

    pub(super) fn on_suback(&mut self, pkid: u16, granted: bool) {
        let Some(channel) = self.sub_pkids.remove(&pkid) else {
            return;
        };
        self.next_check.remove(&channel);
        let now = Instant::now();
        if granted {
            self.subs.insert(
                channel,
                Sub::Granted {
                    at: now,
                    heard: false,
                },
            );
            if let Some(p) = self.pending.get_mut(&channel) {
                if p.stage == Stage::InDoubt {
                    // The newest entry comes right after the SUBACK.
                    p.stage = Stage::Probe {
                        until: now + self.confirm_timeout,
                    };
                }
            }
            return;
        }
        self.subs.remove(&channel);
        self.unconfirmable.insert(channel);
        tracing::warn!(
            %channel,
            "ThingSpeak refused the subscription to the channel's feed: updates of this channel \
             count as delivered once written (no confirmation); authorise the MQTT device to \
             subscribe to enable it"
        );
        if let Some(p) = self.pending.get_mut(&channel) {
            match p.stage {
                Stage::AwaitEcho { .. } | Stage::Probe { .. } => self.deliver(channel, false),
                Stage::InDoubt => p.stage = Stage::Ready,
                Stage::Ready | Stage::Writing => {}
            }
        }
    }

    /// An entry relayed on a channel's feed subscription.
    pub(super) fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let channel = match Topic::parse(topic) {
            Ok(Topic::Subscribe { channel } | Topic::SubscribeJson { channel, .. }) => channel,
            _ => {
                tracing::debug!(topic, "message on an unexpected topic; ignored");
                return;
            }
        };
        let entry: EntryJson = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "unreadable entry on the channel feed; ignored");
                return;
            }
        };
        if let Some(Sub::Granted { heard, .. }) = self.subs.get_mut(&channel) {
            *heard = true;
        }
        let values: BTreeMap<Target, String> = thingspeak::payload::all_targets()
            .filter_map(|t| entry.get(t).map(|v| (t, v.to_owned())))
            .collect();
        self.saw_entry(channel, entry.created_at, values.clone());
        self.echo_settles_doubt(channel, entry.created_at, &values);
        let Some(p) = self.pending.get_mut(&channel) else {
            return;
        };
        if p.batch.created_at() != Some(entry.created_at) {
            return;
        }
        if same_entry(&p.batch, |t| values.get(&t).cloned()) {
            tracing::debug!(%channel, entry_id = entry.entry_id, "update confirmed");
            if p.maybe_stored {
                self.count_doubt(channel, "echo");
            }
            self.deliver(channel, true);
        } else {
            // The timestamp belongs to another entry, or (for a window of
            // the previous run) to ours with other readings.
            let Some(p) = self.pending.remove(&channel) else {
                return;
            };
            self.next_check.remove(&channel);
            let theirs = values
                .iter()
                .map(|(t, v)| format!("{t}={v}"))
                .collect::<Vec<_>>()
                .join("&");
            self.stored_differs(channel, &p.batch, &theirs);
        }
    }

    /// Moves the outstanding update of `channel` forward.
    pub(super) fn advance_pending(&mut self, channel: ChannelId, now: Instant) -> Instant {
        let idle = now + IDLE;
        let Some(stage) = self.pending.get(&channel).map(|p| p.stage) else {
            return now;
        };
        match stage {
            Stage::Writing => idle,
            // Subscribing delivers the channel's newest entry: the check. Its
            // SUBACK (an event) starts the wait for that entry.
            Stage::InDoubt => match self.subs.get(&channel) {
                Some(_) => idle,
                None if matches!(self.conn, Conn::Up { .. }) => {
                    if self.subscribe(channel) {
                        idle
                    } else {
                        now + STORE_RETRY
                    }
                }
                None => idle,
            },
            Stage::AwaitEcho { until } if now < until => until,
            Stage::AwaitEcho { .. }
                if self.pending.get(&channel).is_some_and(|p| p.maybe_stored) =>
            {
                // A resend of something that may be stored: ThingSpeak
                // rejects it silently if so. It waits aside, and the channel
                // goes on: the echo of its next update settles it.
                let Some(p) = self.pending.remove(&channel) else {
                    return now;
                };
                tracing::info!(
                    %channel,
                    created_at = ?p.batch.created_at().map(|t| thingspeak::format_timestamp(&t)),
                    "update in doubt got no echo (ThingSpeak may have it already); the channel \
                     goes on, and the echo of its next update settles it"
                );
                self.set_aside(channel, p, None);
                now
            }
            Stage::AwaitEcho { .. } => {
                // No echo: check whether ThingSpeak has it (its newest entry)
                // before sending it again.
                tracing::debug!(%channel, "no echo in time; checking the channel's newest entry");
                if self.subscribe(channel) {
                    let until = now + self.confirm_timeout;
                    if let Some(p) = self.pending.get_mut(&channel) {
                        p.stage = Stage::Probe { until };
                    }
                    until
                } else {
                    now + STORE_RETRY
                }
            }
            Stage::Probe { until } if now < until => until,
            Stage::Probe { .. } => {
                let Some(p) = self.pending.get_mut(&channel) else {
                    return now;
                };
                p.probes += 1;
                if p.probes >= MAX_PROBES {
                    // Never seen although we are its only writer: something
                    // else may own the timestamp, or the link loses nearly
                    // everything. Every probed update was written at least
                    // once, so ThingSpeak may have it: never restamped. It
                    // waits aside like any doubt (its readings stay queued)
                    // and the channel goes on; the echo of its next update,
                    // or a late echo of this one, settles it.
                    let Some(p) = self.pending.remove(&channel) else {
                        return now;
                    };
                    tracing::warn!(
                        %channel,
                        checks = p.probes,
                        created_at = ?p.batch.created_at().map(|t| thingspeak::format_timestamp(&t)),
                        "update never confirmed; kept in doubt (not restamped), the channel goes on"
                    );
                    self.set_aside(channel, p, None);
                    return now;
                }
                tracing::info!(%channel, "update not stored by ThingSpeak; resending it");
                p.stage = Stage::Ready;
                self.try_publish(channel, now)
            }
            Stage::Ready => self.try_publish(channel, now),
        }
    }

    /// Asks for the channel's feed (again). False if the connection cannot take it now.
    pub(super) fn subscribe(&mut self, channel: ChannelId) -> bool {
        let Conn::Up { client, .. } = &self.conn else {
            return false;
        };
        let topic = match self.config.auth {
            Auth::Device => Topic::Subscribe { channel },
            // Private channels need the read key; public ones none.
            Auth::Legacy => Topic::SubscribeJson {
                channel,
                key: self.config.read_key(channel),
            },
        }
        .to_string();
        match client.try_subscribe(topic, QoS::AtMostOnce) {
            Ok(()) => {
                self.sub_order.push_back(channel);
                self.subs.insert(channel, Sub::Requested);
                true
            }
            Err(e) => {
                tracing::debug!(%channel, error = %e, "could not subscribe now");
                false
            }
        }
    }
}
