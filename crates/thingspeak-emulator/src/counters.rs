//! What happened so far, for assertions in tests and the `/api/counters` endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// A snapshot of the emulator's counters.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct Counters {
            $( $(#[$doc])* pub $name: u64, )*
        }

        /// The live counters (lock-free, shared by all tasks).
        #[derive(Debug, Default)]
        pub(crate) struct LiveCounters {
            $( pub(crate) $name: AtomicU64, )*
        }

        impl LiveCounters {
            pub(crate) fn snapshot(&self) -> Counters {
                Counters { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Transport connections accepted (before TLS/WebSocket/CONNECT).
    connections,
    /// Connections that failed or timed out in the TLS/WebSocket handshake or before CONNECT.
    handshake_failures,
    /// MQTT sessions that got CONNACK 0.
    sessions,
    /// CONNECTs refused (any CONNACK code other than 0, or closed by a refusal fault).
    refusals,
    /// PUBLISH packets received in sessions.
    publishes,
    /// Updates stored (MQTT, update.json; not bulk).
    accepted,
    /// Updates silently dropped by the per-channel rate limit.
    dropped_rate_limit,
    /// Updates rejected because their created_at already existed.
    rejected_duplicate_timestamp,
    /// Publishes silently dropped by the drop-publishes fault.
    dropped_fault,
    /// Connections closed for being idle (no PUBLISH/SUBSCRIBE within the idle timeout).
    closed_idle,
    /// Connections closed because no packet at all came within 1.5x the client's keep-alive.
    closed_keepalive,
    /// Sessions ended because a new connection used the same client id.
    closed_taken_over,
    /// Connections closed for a protocol or ThingSpeak rule violation.
    closed_invalid,
    /// Connections closed by the drop-all-connections fault or shutdown.
    closed_by_fault,
    /// Subscriptions granted.
    subscriptions,
    /// Subscriptions refused (SUBACK failure code).
    subscriptions_refused,
    /// Messages sent to subscribers (initial last entry and relays).
    relayed,
    /// Bulk-update calls received.
    bulk_calls,
    /// Bulk-update calls answered with an error status.
    bulk_rejected,
    /// Entries stored by bulk calls.
    bulk_entries,
    /// update.json calls received.
    update_calls,
    /// update.json calls answered `0` or an error status.
    update_rejected,
    /// Read API calls (`feeds.json`, `feeds/last.json`).
    feed_reads,
    /// Read API calls on a private channel without its read key (answered `-1`).
    feed_reads_refused,
}

impl LiveCounters {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
