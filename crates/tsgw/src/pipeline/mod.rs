//! The gateway's one-way flow, wired together:
//!
//! ```text
//! sources (mqtt, serial, modbus) ──mpsc<Reading>──► writer ──► DurableQueue ──► forwarder ──► ThingSpeak
//! ```

pub mod heartbeat;
pub mod writer;
