//! The state every listener, session and HTTP handler shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use thingspeak::{ChannelId, ChannelUpdate};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::DeviceSpec;
use crate::counters::LiveCounters;
use crate::faults::Faults;
use crate::state::{Entry, Store, WriteOrigin, WriteRejected};

/// How many relayed entries a slow session may fall behind before it misses some.
const RELAY_CAPACITY: usize = 1024;

/// Timing settings of MQTT sessions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionSettings {
    pub idle_timeout: Duration,
    /// Bound on TLS and WebSocket handshakes and on the wait for CONNECT.
    pub handshake_timeout: Duration,
}

/// Who a CONNECT turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Identity {
    /// An MQTT device (current API), authorised for these channels.
    Device {
        client_id: String,
        channels: Vec<ChannelId>,
    },
    /// No device credentials: legacy topics with keys only.
    Legacy,
}

pub(crate) struct Core {
    store: Mutex<Store>,
    pub counters: LiveCounters,
    pub faults: Faults,
    pub relay: broadcast::Sender<Arc<Entry>>,
    devices: Vec<DeviceSpec>,
    mqtt_api_keys: Vec<String>,
    pub session: SessionSettings,
    pub shutdown: CancellationToken,
    /// Replaced by a fresh child of `shutdown` each time all connections are dropped.
    connections: Mutex<CancellationToken>,
    /// Open sessions by client id, for taking over a session when the same
    /// client id connects again (MQTT 3.1.1 §3.1.4).
    sessions: Mutex<HashMap<String, (u64, CancellationToken)>>,
    next_session: AtomicU64,
}

impl Core {
    pub fn new(
        store: Store,
        devices: Vec<DeviceSpec>,
        mqtt_api_keys: Vec<String>,
        session: SessionSettings,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let connections = Mutex::new(shutdown.child_token());
        Self {
            store: Mutex::new(store),
            counters: LiveCounters::default(),
            faults: Faults::default(),
            relay: broadcast::channel(RELAY_CAPACITY).0,
            devices,
            mqtt_api_keys,
            session,
            shutdown,
            connections,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        }
    }

    /// Registers a session under its client id, ending any earlier session with
    /// that id. Returns the registration id and the token that ends this one.
    pub fn register_session(&self, client_id: &str) -> (u64, CancellationToken) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        if !client_id.is_empty() {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, old)) = map.insert(client_id.to_owned(), (id, token.clone())) {
                old.cancel();
            }
        }
        (id, token)
    }

    pub fn unregister_session(&self, client_id: &str, id: u64) {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(client_id)
            .is_some_and(|(current, _)| *current == id)
        {
            map.remove(client_id);
        }
    }

    /// The store, even if a panicking task poisoned the lock (its data stays consistent:
    /// every mutation is a single push).
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token a connection watches: cancelled by `drop_all_connections` or shutdown.
    pub fn connection_token(&self) -> CancellationToken {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn drop_all_connections(&self) {
        let mut guard = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        guard.cancel();
        *guard = self.shutdown.child_token();
    }

    /// Checks CONNECT credentials. `None` means refuse (CONNACK 5).
    pub fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Option<Identity> {
        if username.is_empty() && password.is_empty() {
            return Some(Identity::Legacy);
        }
        if let Some(d) = self
            .devices
            .iter()
            .find(|d| d.username == username && d.password == password)
        {
            // ThingSpeak ties the credentials to the device's client id.
            return (d.client_id == client_id).then(|| Identity::Device {
                client_id: d.client_id.clone(),
                channels: d.channels.clone(),
            });
        }
        // Legacy: any username plus the account's MQTT API key; or a username
        // without password, as legacy publishers with a write key in the topic send.
        if password.is_empty() || self.mqtt_api_keys.iter().any(|k| k == password) {
            return Some(Identity::Legacy);
        }
        None
    }

    /// Applies one update (MQTT or update.json): counts it and relays it to subscribers.
    pub fn write(
        &self,
        channel: ChannelId,
        update: &ChannelUpdate,
        origin: WriteOrigin,
    ) -> Result<Entry, WriteRejected> {
        let result = {
            let mut store = self.store();
            let result = store.write(channel, update, origin, Instant::now(), Utc::now());
            if let Ok(entry) = &result {
                if origin != WriteOrigin::Bulk {
                    // Sent under the store lock so relays leave in entry-id order:
                    // sessions skip ids they have already passed. No receivers is fine.
                    let _ = self.relay.send(Arc::new(entry.clone()));
                }
            }
            result
        };
        match &result {
            Ok(_) => LiveCounters::inc(&self.counters.accepted),
            Err(WriteRejected::RateLimited { .. }) => {
                LiveCounters::inc(&self.counters.dropped_rate_limit)
            }
            Err(WriteRejected::DuplicateTimestamp { .. }) => {
                LiveCounters::inc(&self.counters.rejected_duplicate_timestamp)
            }
            Err(WriteRejected::UnknownChannel(_)) => {}
        }
        result
    }
}
