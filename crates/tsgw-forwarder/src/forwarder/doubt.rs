//! Updates in doubt: windows that an earlier write (of this run, or of the
//! run before a crash) may already have stored. They are settled by evidence,
//! never by giving their readings a new `created_at`:
//!
//! 1. an entry seen on the channel's subscription with the window's
//!    `created_at` (its echo, or the newest entry ThingSpeak delivers on
//!    subscribing): the same values settle it as delivered, other values as
//!    `stored_differs`;
//! 2. for a window older than this run (the previous run may have written
//!    it), ThingSpeak's REST read API, `feeds.json` over the range of such
//!    windows, with the channel's read key (none for a public channel): found
//!    is delivered (`read_api`), absent is sent normally (`not_stored`);
//! 3. over MQTT alone: the window is resent with the same `created_at`. If
//!    that resend stays unechoed for `confirm_timeout_secs` while the
//!    connection is healthy, it waits aside (a "doubt") and the channel goes
//!    on; the echo of a later update of the channel written on the same
//!    connection shows that ThingSpeak took that later update and rejected the
//!    resend, which it does only for a `created_at` it already has: delivered
//!    (`duplicate`).
//!
//! A window whose stored entry holds other values is counted and logged, and
//! not resent: if this run wrote it, the entry is not ours and the readings
//! join the next window; if an earlier run may have (the window predates
//! this run), the entry is ours with a different set of readings, and
//! sending them again would store some twice: they are removed and counted
//! as dropped (`stored_differs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use thingspeak::{ChannelId, FeedEntry, Target};
use tokio::time::Instant;
use tsgw_core::QueueKey;

use crate::batch::{window_len, Batch};
use crate::rest::ReadResult;

use super::confirm::{same_value, Pending};
use super::poison::RIGHT_AFTER;
use super::Forwarder;

/// Entries remembered per channel from its subscription.
const SEEN_MEMORY: usize = 256;
/// Entries of read-API answers remembered per channel: two full answers.
/// Windows go out oldest first, so the oldest knowledge is the first not
/// needed; forgetting it only means reading again (see [`Evidence::remember`]).
const STORED_MEMORY: usize = 2 * thingspeak::read::MAX_RESULTS;
/// Answered ranges remembered per channel.
const KNOWN_MEMORY: usize = 64;
/// After a failed read, MQTT evidence alone for this long before asking again.
const READ_RETRY: Duration = Duration::from_secs(60);

/// What to do with a window about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Send it. `maybe_stored`: an earlier write may have stored it, so an
    /// unechoed resend is a doubt, not a loss.
    Send { maybe_stored: bool },
    /// Evidence is on its way (a read); look again then at the latest.
    Wait(Instant),
    /// Settled without sending: look at the channel again now.
    Settled,
}

/// Where the read API stands for a channel.
#[derive(Debug, Clone, Default)]
pub(super) enum ReadState {
    #[default]
    NotAsked,
    /// A read of the entries created in `[start, end]` is on its way.
    Asking {
        since: Instant,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    /// Answered: what it covers is in [`Evidence::known`].
    Answered,
    /// No read access (`-1`) or reads off: MQTT evidence only.
    Unavailable,
    Failed {
        retry_at: Instant,
    },
}

/// A written update whose resend got no echo; its readings stay queued.
pub(super) struct Doubt {
    pub(super) batch: Batch,
    /// The connection generation and write number of its last write; `None`
    /// once that connection is gone (it is then sent again).
    pub(super) written: Option<(u64, u64)>,
    /// Where "written" counts: when it was written. It counts as delivered
    /// once its connection outlived [`RIGHT_AFTER`] after that, or wrote a
    /// later publish; a close before either (ThingSpeak closes right after
    /// a publish it refuses) leaves it queued, to be resent with the same
    /// `created_at`.
    pub(super) survive: Option<Instant>,
}

/// What the forwarder knows of one channel's stored entries.
#[derive(Default)]
pub(super) struct Evidence {
    /// Values of entries seen on the subscription, by `created_at`.
    pub(super) seen: BTreeMap<DateTime<Utc>, BTreeMap<Target, String>>,
    pub(super) read: ReadState,
    /// Ranges `[start, end]` the read API answered for in full, and the
    /// entries it returned in them. A window in none of them is read again.
    pub(super) known: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    pub(super) stored: BTreeMap<DateTime<Utc>, FeedEntry>,
    /// Oldest first.
    pub(super) doubts: Vec<Doubt>,
    /// Windows the read API showed absent, counted once (a window not yet
    /// sent is decided afresh on every pass).
    pub(super) absent: BTreeSet<DateTime<Utc>>,
}

impl Evidence {
    /// Adds a read answer covering `[start, end]`, keeping the memory bounded
    /// (a gateway runs for years): beyond [`STORED_MEMORY`] entries or
    /// [`KNOWN_MEMORY`] ranges the oldest are forgotten, and no range keeps
    /// claiming a time whose entries were forgotten, so a window there is read
    /// again rather than judged absent.
    pub(super) fn remember(
        &mut self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        entries: impl IntoIterator<Item = FeedEntry>,
    ) {
        self.known.push((start, end));
        self.stored
            .extend(entries.into_iter().map(|e| (e.created_at, e)));
        let mut forgotten_through = None;
        while self.stored.len() > STORED_MEMORY {
            forgotten_through = self.stored.pop_first().map(|(t, _)| t);
        }
        if let Some(cutoff) = forgotten_through {
            let after = cutoff + TimeDelta::microseconds(1);
            self.known.retain(|&(_, end)| end > cutoff);
            for range in &mut self.known {
                range.0 = range.0.max(after);
            }
        }
        while self.known.len() > KNOWN_MEMORY {
            let oldest = (0..self.known.len())
                .min_by_key(|&i| self.known[i].0)
                .unwrap_or(0);
            self.known.swap_remove(oldest);
        }
    }

    /// Readings and `created_at` values held by doubts, kept out of new windows.
    pub(super) fn held(&self) -> (BTreeSet<QueueKey>, BTreeSet<DateTime<Utc>>) {
        let keys = self
            .doubts
            .iter()
            .flat_map(|d| d.batch.covered.iter().copied())
            .collect();
        let times = self
            .doubts
            .iter()
            .filter_map(|d| d.batch.created_at())
            .collect();
        (keys, times)
    }
}

/// The end of a feed read, reported by its task.
pub(super) struct ReadDone {
    pub(super) channel: ChannelId,
    pub(super) start: DateTime<Utc>,
    pub(super) end: DateTime<Utc>,
    pub(super) result: ReadResult,
}

/// Whether the stored values are the update's (numbers compared as numbers).
pub(super) fn same_entry(batch: &Batch, stored: impl Fn(Target) -> Option<String>) -> bool {
    batch
        .update
        .values
        .iter()
        .all(|(target, value)| stored(*target).is_some_and(|got| same_value(&got, value)))
}

fn describe(values: impl Iterator<Item = (Target, String)>) -> String {
    values
        .map(|(t, v)| format!("{t}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

impl Forwarder {
    /// Sets a written update aside as a doubt: its readings stay queued and
    /// out of new windows while the channel goes on. `survive` is when it was
    /// written, where "written" counts (see [`Doubt::survive`]).
    pub(super) fn set_aside(&mut self, channel: ChannelId, p: Pending, survive: Option<Instant>) {
        self.evidence
            .entry(channel)
            .or_default()
            .doubts
            .push(Doubt {
                batch: p.batch,
                written: p.written,
                survive,
            });
    }

    /// The previous run may have written a window that closed before this
    /// run started (it sent only closed windows).
    pub(super) fn inherited(&self, channel: ChannelId, created_at: DateTime<Utc>) -> bool {
        let len = window_len(self.schedule.interval(channel));
        created_at + TimeDelta::from_std(len).unwrap_or(TimeDelta::MAX) <= self.started_utc
    }

    /// Remembers an entry seen on the channel's subscription.
    pub(super) fn saw_entry(
        &mut self,
        channel: ChannelId,
        created_at: DateTime<Utc>,
        values: BTreeMap<Target, String>,
    ) {
        let seen = &mut self.evidence.entry(channel).or_default().seen;
        seen.insert(created_at, values);
        while seen.len() > SEEN_MEMORY {
            seen.pop_first();
        }
    }

    /// Decides what evidence says about a window before it is sent.
    pub(super) fn check_window(
        &mut self,
        channel: ChannelId,
        batch: &Batch,
        now: Instant,
    ) -> Verdict {
        let Some(created_at) = batch.created_at() else {
            return Verdict::Send {
                maybe_stored: false,
            };
        };
        let seen = self
            .evidence
            .get(&channel)
            .and_then(|e| e.seen.get(&created_at))
            .cloned();
        if let Some(values) = seen {
            self.settle(channel, batch.clone(), "echo", |t| values.get(&t).cloned());
            return Verdict::Settled;
        }
        if !self.inherited(channel, created_at) {
            return Verdict::Send {
                maybe_stored: false,
            };
        }
        let readable = self.config.read_api && self.bulk.is_some();
        if !readable {
            return Verdict::Send { maybe_stored: true };
        }
        let evidence = self.evidence.entry(channel).or_default();
        if evidence
            .known
            .iter()
            .any(|(start, end)| *start <= created_at && created_at <= *end)
        {
            return match evidence.stored.get(&created_at).cloned() {
                Some(entry) => {
                    self.settle(channel, batch.clone(), "read_api", |t| {
                        entry.get(t).map(str::to_owned)
                    });
                    Verdict::Settled
                }
                None => {
                    let absent = &mut evidence.absent;
                    if absent.insert(created_at) {
                        while absent.len() > SEEN_MEMORY {
                            absent.pop_first();
                        }
                        self.count_doubt(channel, "not_stored");
                        tracing::debug!(%channel, created_at = %thingspeak::format_timestamp(&created_at),
                            "the read API shows no entry at this created_at; sending it");
                    }
                    Verdict::Send {
                        maybe_stored: false,
                    }
                }
            };
        }
        match evidence.read {
            ReadState::Unavailable => Verdict::Send { maybe_stored: true },
            ReadState::Failed { retry_at } if now < retry_at => {
                Verdict::Send { maybe_stored: true }
            }
            ReadState::Asking { since, .. } => {
                let until = since + self.confirm_timeout;
                if now < until {
                    Verdict::Wait(until)
                } else {
                    // Not held back longer than one confirm timeout: the
                    // MQTT evidence settles it instead.
                    Verdict::Send { maybe_stored: true }
                }
            }
            // Not covered by what was read (a full answer holds only the
            // newest entries of its range): read from this window up to
            // the oldest range already known after it.
            _ => {
                let end = evidence
                    .known
                    .iter()
                    .map(|(start, _)| *start)
                    .filter(|start| *start > created_at)
                    .min()
                    .map_or(self.started_utc, |start| start - TimeDelta::seconds(1))
                    .max(created_at);
                self.start_read(channel, created_at, end, now);
                Verdict::Wait(now + self.confirm_timeout)
            }
        }
    }

    /// Asks the read API for the entries created in `[start, end]`.
    fn start_read(
        &mut self,
        channel: ChannelId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        now: Instant,
    ) {
        let Some(client) = self.bulk.clone() else {
            return;
        };
        let key = self.config.read_key(channel);
        let timeout = self.confirm_timeout;
        self.evidence.entry(channel).or_default().read = ReadState::Asking {
            since: now,
            start,
            end,
        };
        tracing::debug!(%channel, "reading the channel's entries to settle updates in doubt");
        let tx = self.reads_tx.clone();
        tokio::spawn(async move {
            let result = client
                .read_feeds(channel, start, end, key.as_ref(), timeout)
                .await;
            let _ = tx
                .send(ReadDone {
                    channel,
                    start,
                    end,
                    result,
                })
                .await;
        });
    }

    pub(super) fn on_read_done(&mut self, done: ReadDone) {
        let channel = done.channel;
        self.next_check.remove(&channel);
        let now = Instant::now();
        let state = match done.result {
            ReadResult::Entries(list) => {
                // A full answer holds the range's NEWEST entries (as
                // ThingSpeak and the emulator answer): it covers only
                // `[its oldest entry, end]`; windows before that are read
                // again, over a narrower range.
                let start = if list.len() >= thingspeak::read::MAX_RESULTS {
                    list.iter()
                        .map(|e| e.created_at)
                        .min()
                        .map_or(done.start, |first| first.max(done.start))
                } else {
                    done.start
                };
                self.evidence
                    .entry(channel)
                    .or_default()
                    .remember(start, done.end, list);
                ReadState::Answered
            }
            ReadResult::NoAccess => {
                tracing::info!(
                    %channel,
                    "the read API answered -1 (a private channel, and no or a wrong \
                     upstream.channels.\"{channel}\".read_key): updates in doubt of this channel \
                     are settled over MQTT alone"
                );
                ReadState::Unavailable
            }
            ReadResult::Failed(message) => {
                tracing::warn!(
                    %channel,
                    error = %message,
                    retry_in_secs = READ_RETRY.as_secs(),
                    "reading the channel's entries failed; settling updates in doubt over MQTT meanwhile"
                );
                ReadState::Failed {
                    retry_at: now + READ_RETRY,
                }
            }
        };
        let evidence = self.evidence.entry(channel).or_default();
        // The answer to an earlier read (one given up on) leaves its entries
        // known but does not end the read now on its way.
        let current = match evidence.read {
            ReadState::Asking { start, end, .. } => start == done.start && end == done.end,
            _ => true,
        };
        if current || matches!(state, ReadState::Unavailable) {
            evidence.read = state;
        }
    }

    /// Settles `batch` (not the pending update) against a stored entry.
    fn settle(
        &mut self,
        channel: ChannelId,
        batch: Batch,
        how: &'static str,
        stored: impl Fn(Target) -> Option<String>,
    ) {
        if same_entry(&batch, &stored) {
            tracing::info!(
                %channel,
                created_at = ?batch.created_at().map(|t| thingspeak::format_timestamp(&t)),
                evidence = how,
                "update in doubt was stored already; not sending it again"
            );
            self.count_doubt(channel, how);
            self.deliver_batch(channel, &batch, true);
        } else {
            let theirs = describe(
                thingspeak::payload::all_targets().filter_map(|t| stored(t).map(|v| (t, v))),
            );
            self.stored_differs(channel, &batch, &theirs);
        }
    }

    /// An entry at the window's `created_at` holds other values.
    pub(super) fn stored_differs(&mut self, channel: ChannelId, batch: &Batch, theirs: &str) {
        let Some(created_at) = batch.created_at() else {
            return;
        };
        self.count_doubt(channel, "stored_differs");
        let ours = describe(batch.update.values.iter().map(|(t, v)| (*t, v.clone())));
        let at = thingspeak::format_timestamp(&created_at);
        if self.inherited(channel, created_at) {
            tracing::error!(
                %channel,
                created_at = %at,
                ours = %ours,
                stored = %theirs,
                readings = batch.covered.len(),
                "the channel's entry at this created_at holds other values than the window \
                 (an earlier run stored it with other readings): not sending them again, which \
                 could store some twice; removed and counted as dropped (stored_differs)"
            );
            match self.store.remove(&batch.covered) {
                Ok(()) => {
                    self.metrics
                        .updates_dropped_total
                        .with_label_values(&[&channel.to_string(), "stored_differs"])
                        .inc();
                    self.mark_used(channel, [created_at]);
                }
                Err(e) => tracing::error!(%channel, error = %e, "could not remove the readings"),
            }
        } else {
            // This run's write was rejected: the entry is someone else's.
            tracing::warn!(
                %channel,
                created_at = %at,
                ours = %ours,
                stored = %theirs,
                "the channel already has a different entry at this created_at; \
                 the readings move to the next window"
            );
            self.mark_used(channel, [created_at]);
        }
    }

    pub(super) fn count_doubt(&self, channel: ChannelId, resolution: &str) {
        self.metrics
            .updates_in_doubt_total
            .with_label_values(&[&channel.to_string(), resolution])
            .inc();
    }

    /// A later update of `channel`, written as `(generation, seq)`, was
    /// echoed: every doubt resent before it on the same connection was
    /// rejected by ThingSpeak, i.e. its `created_at` was already stored.
    pub(super) fn settle_doubts_before(&mut self, channel: ChannelId, written: (u64, u64)) {
        let Some(evidence) = self.evidence.get_mut(&channel) else {
            return;
        };
        let (settled, kept): (Vec<Doubt>, Vec<Doubt>) = std::mem::take(&mut evidence.doubts)
            .into_iter()
            .partition(|d| {
                d.written
                    .is_some_and(|(g, s)| g == written.0 && s < written.1)
            });
        evidence.doubts = kept;
        for d in settled {
            tracing::info!(
                %channel,
                created_at = ?d.batch.created_at().map(|t| thingspeak::format_timestamp(&t)),
                "update in doubt settled: its resend stayed unechoed while a later update was \
                 echoed, so ThingSpeak already had it (duplicate)"
            );
            self.count_doubt(channel, "duplicate");
            self.deliver_batch(channel, &d.batch, true);
        }
    }

    /// An entry seen on the subscription may settle a doubt.
    pub(super) fn echo_settles_doubt(
        &mut self,
        channel: ChannelId,
        created_at: DateTime<Utc>,
        values: &BTreeMap<Target, String>,
    ) {
        let Some(evidence) = self.evidence.get_mut(&channel) else {
            return;
        };
        let Some(i) = evidence
            .doubts
            .iter()
            .position(|d| d.batch.created_at() == Some(created_at))
        else {
            return;
        };
        let doubt = evidence.doubts.remove(i);
        self.settle(channel, doubt.batch, "echo", |t| values.get(&t).cloned());
    }

    /// The connection is gone: doubts whose evidence was not complete are sent again.
    pub(super) fn doubts_lose_connection(&mut self) {
        for evidence in self.evidence.values_mut() {
            for d in &mut evidence.doubts {
                d.written = None;
                d.survive = None;
            }
        }
    }

    /// Where "written" counts: a write of the current connection that
    /// outlived [`RIGHT_AFTER`] (by `now`), or every one of them when a later
    /// publish was written (`later_write`), counts as delivered. Returns when
    /// the next of `channel`'s writes will have survived, if any waits.
    pub(super) fn settle_survivors(
        &mut self,
        channel: Option<ChannelId>,
        later_write: bool,
        now: Instant,
    ) -> Option<Instant> {
        let generation = self.current_generation()?;
        let mut next = None;
        let mut survived = Vec::new();
        for (c, evidence) in &mut self.evidence {
            if channel.is_some_and(|ch| ch != *c) {
                continue;
            }
            let (done, kept): (Vec<Doubt>, Vec<Doubt>) = std::mem::take(&mut evidence.doubts)
                .into_iter()
                .partition(|d| match (d.survive, d.written) {
                    (Some(at), Some((g, _))) if g == generation => {
                        later_write || now >= at + RIGHT_AFTER
                    }
                    _ => false,
                });
            evidence.doubts = kept;
            for d in &evidence.doubts {
                if let (Some(at), Some((g, _))) = (d.survive, d.written) {
                    if g == generation {
                        let at = at + RIGHT_AFTER;
                        next = Some(next.map_or(at, |n: Instant| n.min(at)));
                    }
                }
            }
            survived.extend(done.into_iter().map(|d| (*c, d.batch)));
        }
        for (c, batch) in survived {
            self.deliver_batch(c, &batch, false);
        }
        next
    }

    /// The oldest doubt to send again, if any (taken out of the list).
    pub(super) fn take_unsent_doubt(&mut self, channel: ChannelId) -> Option<Batch> {
        let evidence = self.evidence.get_mut(&channel)?;
        let i = evidence.doubts.iter().position(|d| d.written.is_none())?;
        Some(evidence.doubts.remove(i).batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(secs: i64) -> FeedEntry {
        serde_json::from_value(serde_json::json!({
            "created_at": DateTime::from_timestamp(1_764_000_000 + secs, 0)
                .unwrap()
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
            "entry_id": secs,
            "field1": "1",
        }))
        .unwrap()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000 + secs, 0).unwrap()
    }

    fn covered(evidence: &Evidence, t: DateTime<Utc>) -> bool {
        evidence.known.iter().any(|&(s, e)| s <= t && t <= e)
    }

    #[test]
    fn read_answers_are_remembered_within_bounds_and_never_claim_forgotten_times() {
        let mut evidence = Evidence::default();
        let per_read = thingspeak::read::MAX_RESULTS as i64;
        // Three full answers, one after the other: more than STORED_MEMORY.
        for read in 0..3 {
            let from = read * per_read;
            evidence.remember(
                at(from),
                at(from + per_read - 1),
                (from..from + per_read).map(entry),
            );
        }
        assert_eq!(evidence.stored.len(), STORED_MEMORY);
        // The first answer's entries are forgotten, and so is its range: a
        // window there is read again, not judged absent.
        assert!(!evidence.stored.contains_key(&at(0)));
        assert!(!covered(&evidence, at(0)));
        assert!(!covered(&evidence, at(per_read - 1)));
        // What is remembered is still covered and found.
        assert!(covered(&evidence, at(per_read)));
        assert!(evidence.stored.contains_key(&at(per_read)));
        assert!(covered(&evidence, at(3 * per_read - 1)));

        // Many small answers: the ranges stay bounded, the newest kept.
        for read in 0..(2 * KNOWN_MEMORY as i64) {
            let t = 10 * per_read + 10 * read;
            evidence.remember(at(t), at(t + 5), [entry(t)]);
        }
        assert!(evidence.known.len() <= KNOWN_MEMORY);
        assert!(covered(
            &evidence,
            at(10 * per_read + 10 * (2 * KNOWN_MEMORY as i64 - 1))
        ));
        assert!(evidence.stored.len() <= STORED_MEMORY);
    }
}
