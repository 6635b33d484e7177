//! Commands written to a running port (downlink): bytes from a template,
//! written by the port's own task, which holds the port (opened exclusively).
//!
//! A command carries its deadline: one that waited past it (the port was
//! unplugged, or reopening) is dropped, never written late.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Commands queued per port before a sender waits.
pub(crate) const COMMAND_QUEUE: usize = 16;

/// Why a command was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("no serial port named {0:?}")]
    UnknownPort(String),
    #[error("the port was not open within {0:?} (unplugged, or reopening)")]
    NotOpen(Duration),
    #[error("write: {0}")]
    Write(String),
    #[error("the port's task has stopped (gateway stopping or reloading)")]
    Stopped,
}

impl CommandError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CommandError::UnknownPort(_) => "unknown_port",
            CommandError::NotOpen(_) => "port_not_open",
            CommandError::Write(_) => "io",
            CommandError::Stopped => "stopped",
        }
    }
}

pub(crate) struct Command {
    pub(crate) bytes: Vec<u8>,
    pub(crate) deadline: Instant,
    pub(crate) within: Duration,
    pub(crate) reply: oneshot::Sender<Result<(), CommandError>>,
}

/// Sends commands to the running ports. Cheap to clone.
#[derive(Clone, Default)]
pub struct SerialWriter {
    ports: Arc<HashMap<String, mpsc::Sender<Command>>>,
}

impl SerialWriter {
    pub(crate) fn new(ports: HashMap<String, mpsc::Sender<Command>>) -> Self {
        Self {
            ports: Arc::new(ports),
        }
    }

    pub fn has_port(&self, port: &str) -> bool {
        self.ports.contains_key(port)
    }

    /// Writes `bytes` to `port` (and flushes) within `within`.
    pub async fn send(
        &self,
        port: &str,
        bytes: Vec<u8>,
        within: Duration,
    ) -> Result<(), CommandError> {
        let tx = self
            .ports
            .get(port)
            .ok_or_else(|| CommandError::UnknownPort(port.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        let command = Command {
            bytes,
            deadline: Instant::now() + within,
            within,
            reply,
        };
        tokio::time::timeout(within, tx.send(command))
            .await
            .map_err(|_| CommandError::NotOpen(within))?
            .map_err(|_| CommandError::Stopped)?;
        match tokio::time::timeout(within, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CommandError::Stopped),
            Err(_) => Err(CommandError::NotOpen(within)),
        }
    }
}
