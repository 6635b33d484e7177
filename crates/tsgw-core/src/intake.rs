//! The hand-over from a source to the queue writer, with an optional promise
//! that the readings are on disk.
//!
//! A device that publishes at QoS 1 drops its copy once it gets PUBACK, so the
//! MQTT front must not send PUBACK before the readings are fsynced. It sends an
//! [`IngestBatch`] with a [`DurableAck`]; the queue writer stores the batch,
//! has it flushed (one fsync covers every batch that waits: group commit) and
//! then resolves the ack. The front awaits the matching [`Durable`].

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::reading::Reading;

/// Readings from one source, handed to the queue writer together.
#[derive(Debug)]
pub struct IngestBatch {
    pub readings: Vec<Reading>,
    /// Present when the source waits until the readings are fsynced.
    pub durable: Option<DurableAck>,
    /// The MQTT account that published them, when it logged in as one.
    /// Readings a mapping rule made are named after the rule, so without
    /// this the status page could not tell that the account is sending.
    /// Shared with the session: handing it over allocates nothing.
    pub publisher: Option<Arc<str>>,
}

/// The writer's half: resolve it once the batch is on disk (or never will be).
#[derive(Debug)]
pub struct DurableAck(oneshot::Sender<bool>);

/// The source's half: resolves to `true` once the batch is on disk.
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<bool>);

/// A linked pair: the writer gets the ack, the source keeps the future.
pub fn durable_pair() -> (DurableAck, Durable) {
    let (tx, rx) = oneshot::channel();
    (DurableAck(tx), Durable(rx))
}

impl DurableAck {
    /// `stored = false` when the batch could not be stored (disk error).
    pub fn resolve(self, stored: bool) {
        // The source may have gone (its device disconnected): nobody to tell.
        let _ = self.0.send(stored);
    }
}

impl Durable {
    /// `true` once the batch is on disk; `false` if it could not be stored or
    /// the writer stopped before it could tell.
    pub async fn stored(self) -> bool {
        self.await
    }
}

/// Polling a `Durable` in place lets a connection keep serving other traffic
/// (in a `select!`) while it waits for the fsync.
impl std::future::Future for Durable {
    type Output = bool;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<bool> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ack_resolves_its_future() {
        let (ack, durable) = durable_pair();
        ack.resolve(true);
        assert!(durable.stored().await);
        let (ack, durable) = durable_pair();
        ack.resolve(false);
        assert!(!durable.stored().await);
    }

    #[tokio::test]
    async fn a_dropped_ack_means_not_stored() {
        let (ack, durable) = durable_pair();
        drop(ack);
        assert!(!durable.stored().await);
    }
}
