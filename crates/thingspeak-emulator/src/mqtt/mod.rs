//! The MQTT side: transports and the per-connection session that enforces ThingSpeak's rules.

pub(crate) mod session;
pub(crate) mod transport;
