//! A poisoned channel: ThingSpeak closes the connection on a publish to a
//! channel the MQTT device may not write (rights revoked after the config was
//! written), and resending it would take the connection, and every other
//! channel on it, down again and again.
//!
//! Told from a flaky network by where the closes fall: the peer closes
//! (`closed_by_peer`, `io`) within [`RIGHT_AFTER`] of that channel's publish,
//! [`STRIKES`] times in a row, with no update of the channel delivered and no
//! later publish of another channel surviving in between. Such a channel is
//! parked: its readings stay queued and it sends nothing until the park ends
//! (backoff doubling from [`PARK_MIN`] to [`PARK_MAX`]); one more close right
//! after its next publish parks it again at once. Each park is counted
//! (`tsgw_channel_parked_total{reason="closed_after_publish"}`, gauge
//! `tsgw_channel_parked`) and logged at error level.

use std::time::Duration;

use thingspeak::ChannelId;
use tokio::time::Instant;

use crate::driver::Closed;

use super::Forwarder;

/// A close this soon after a channel's publish counts against that channel.
pub(super) const RIGHT_AFTER: Duration = Duration::from_secs(2);
/// Closes in a row right after the channel's publish that park it.
pub(super) const STRIKES: u32 = 3;
/// First park.
pub(super) const PARK_MIN: Duration = Duration::from_secs(60);
/// Longest park.
pub(super) const PARK_MAX: Duration = Duration::from_secs(3600);

/// One channel's record of closes right after its publish.
#[derive(Debug, Clone, Copy)]
pub(super) struct Strikes {
    count: u32,
    /// The next park's length.
    next_park: Duration,
    parked_until: Option<Instant>,
}

impl Default for Strikes {
    fn default() -> Self {
        Self {
            count: 0,
            next_park: PARK_MIN,
            parked_until: None,
        }
    }
}

/// The last publish written: whose, on which connection, when.
#[derive(Debug, Clone, Copy)]
pub(super) struct LastWrite {
    channel: ChannelId,
    generation: u64,
    at: Instant,
}

impl Forwarder {
    /// A publish of `channel` was written on connection `generation`.
    pub(super) fn poison_note_write(&mut self, channel: ChannelId, generation: u64, now: Instant) {
        if let Some(prev) = self.last_write {
            if prev.generation == generation && prev.channel != channel {
                // The connection outlived that channel's publish.
                self.poison_cleared(prev.channel);
            }
        }
        self.last_write = Some(LastWrite {
            channel,
            generation,
            at: now,
        });
    }

    /// An update of `channel` was delivered: it is not poisoned.
    pub(super) fn poison_cleared(&mut self, channel: ChannelId) {
        if let Some(s) = self.strikes.get_mut(&channel) {
            if s.parked_until.is_none() {
                *s = Strikes::default();
            }
        }
    }

    /// Connection `generation` closed: a strike for the channel whose publish
    /// it closed right after, if any.
    pub(super) fn poison_note_close(&mut self, closed: &Closed, generation: u64, now: Instant) {
        if !matches!(closed.reason, "closed_by_peer" | "io") {
            return;
        }
        // A publish handed over but not reported written counts too: the
        // close may have overtaken the report.
        let suspect = match (&self.in_flight, self.last_write) {
            (Some(f), _)
                if f.generation == generation && now.duration_since(f.issued) <= RIGHT_AFTER =>
            {
                Some(f.channel)
            }
            (_, Some(w))
                if w.generation == generation && now.duration_since(w.at) <= RIGHT_AFTER =>
            {
                Some(w.channel)
            }
            _ => None,
        };
        let Some(channel) = suspect else {
            return;
        };
        let s = self.strikes.entry(channel).or_default();
        s.count += 1;
        if s.count < STRIKES {
            tracing::warn!(
                %channel,
                closes_in_a_row = s.count,
                "ThingSpeak closed the connection right after this channel's publish"
            );
            return;
        }
        let park = s.next_park;
        s.parked_until = Some(now + park);
        s.next_park = (park * 2).min(PARK_MAX);
        // After the park, one more close right after its publish parks it again.
        s.count = STRIKES - 1;
        let label = channel.to_string();
        self.metrics
            .channel_parked_total
            .with_label_values(&[&label, "closed_after_publish"])
            .inc();
        self.metrics
            .channel_parked
            .with_label_values(&[&label])
            .set(1);
        tracing::error!(
            %channel,
            park_secs = park.as_secs(),
            "ThingSpeak closes the connection right after each publish to this channel: the MQTT \
             device is probably not allowed to write it (check the device's channels in \
             ThingSpeak). Parking the channel so the others keep flowing; its readings stay \
             queued and it is tried again after the park"
        );
    }

    /// When a parked channel may send again (None: not parked).
    pub(super) fn parked_until(&mut self, channel: ChannelId, now: Instant) -> Option<Instant> {
        let s = self.strikes.get_mut(&channel)?;
        let until = s.parked_until?;
        if now < until {
            return Some(until);
        }
        s.parked_until = None;
        self.metrics
            .channel_parked
            .with_label_values(&[&channel.to_string()])
            .set(0);
        tracing::info!(%channel, "park over; trying the channel again");
        None
    }
}
