//! The topic filters local clients hold at rumqttd, so that the front relays
//! a publish to rumqttd only when some local subscriber can want it.
//!
//! Readings never need rumqttd (the front queues them itself), and rumqttd
//! has no backpressure: it reads a socket as fast as it can and buffers what
//! its router has not handled yet without bound (a 1M-message burst relayed
//! to it took the gateway past 2 GB). So a burst that nobody subscribed to
//! never reaches it, and costs it no CPU either.
//!
//! Filters are kept per client id, as rumqttd keeps sessions: a clean
//! session's filters go when its connection ends; a persistent session's stay
//! (rumqttd still queues for it) until the client id connects with a clean
//! session again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::filter::TopicFilter;

#[derive(Default)]
pub struct LocalSubscriptions {
    /// Client id → the filters its session holds.
    owners: RwLock<HashMap<String, HashSet<String>>>,
    /// Every filter some session holds, rebuilt on change (rare) so that the
    /// per-publish check takes no lock.
    snapshot: RwLock<Arc<Vec<TopicFilter>>>,
}

impl LocalSubscriptions {
    /// A client connected. A clean session starts without the filters a
    /// previous session of the same client id held.
    pub fn connected(&self, client_id: &str, clean_session: bool) {
        if clean_session {
            self.change(|owners| owners.remove(client_id).is_some());
        }
    }

    /// A connection ended; a clean session's filters end with it.
    pub fn disconnected(&self, client_id: &str, clean_session: bool) {
        self.connected(client_id, clean_session);
    }

    pub fn subscribed<'a>(&self, client_id: &str, filters: impl IntoIterator<Item = &'a str>) {
        let filters: Vec<&str> = filters.into_iter().collect();
        self.change(|owners| {
            let held = owners.entry(client_id.to_owned()).or_default();
            let mut changed = false;
            for f in &filters {
                changed |= held.insert((*f).to_owned());
            }
            changed
        });
    }

    pub fn unsubscribed<'a>(&self, client_id: &str, filters: impl IntoIterator<Item = &'a str>) {
        let filters: Vec<&str> = filters.into_iter().collect();
        self.change(|owners| {
            let Some(held) = owners.get_mut(client_id) else {
                return false;
            };
            let mut changed = false;
            for f in &filters {
                changed |= held.remove(*f);
            }
            if held.is_empty() {
                owners.remove(client_id);
            }
            changed
        });
    }

    /// Every filter held now.
    pub fn snapshot(&self) -> Arc<Vec<TopicFilter>> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn change(&self, apply: impl FnOnce(&mut HashMap<String, HashSet<String>>) -> bool) {
        let mut owners = self.owners.write().unwrap_or_else(|e| e.into_inner());
        if !apply(&mut owners) {
            return;
        }
        let mut all: Vec<&String> = owners.values().flatten().collect();
        all.sort();
        all.dedup();
        let filters = all
            .into_iter()
            .filter_map(|f| TopicFilter::new(f).ok())
            .collect();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(filters);
    }
}

/// Whether a publish to `topic` may interest a local subscriber.
pub fn wanted(filters: &[TopicFilter], topic: &str) -> bool {
    filters.iter().any(|f| f.matches(topic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(s: &LocalSubscriptions) -> Vec<String> {
        s.snapshot().iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn clean_sessions_take_their_filters_with_them() {
        let s = LocalSubscriptions::default();
        s.connected("a", true);
        s.subscribed("a", ["home/#", "x"]);
        s.connected("b", true);
        s.subscribed("b", ["home/#"]);
        assert_eq!(topics(&s), ["home/#", "x"]);
        assert!(wanted(&s.snapshot(), "home/door"));
        assert!(!wanted(&s.snapshot(), "channels/1/publish"));
        s.unsubscribed("a", ["x"]);
        assert_eq!(topics(&s), ["home/#"]);
        s.disconnected("a", true);
        assert_eq!(topics(&s), ["home/#"], "b still holds it");
        s.disconnected("b", true);
        assert!(topics(&s).is_empty());
    }

    #[test]
    fn persistent_sessions_keep_theirs_until_a_clean_connect() {
        let s = LocalSubscriptions::default();
        s.connected("p", false);
        s.subscribed("p", ["cmd/#"]);
        s.disconnected("p", false);
        assert_eq!(topics(&s), ["cmd/#"]);
        s.connected("p", false);
        assert_eq!(topics(&s), ["cmd/#"]);
        s.connected("p", true);
        assert!(topics(&s).is_empty());
    }
}
