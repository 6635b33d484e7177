//! Writes to configured devices (downlink): a holding register or registers,
//! or a coil, then a read-back of what was written.
//!
//! Writes go through the device's bus task, like its polls: one request at a
//! time on the shared line or connection (a serial port is open once), with
//! the device's timeout. A write takes the bus between two polls, never in
//! the middle of one. It is not retried: the caller decides what a failure
//! means (a setpoint may be written again by the next entry).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

/// What to write, at 0-based protocol addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteValue {
    /// Holding registers from `address` (FC 6 for one, FC 16 for more).
    Registers { address: u16, words: Vec<u16> },
    /// One coil (FC 5).
    Coil { address: u16, value: bool },
}

impl WriteValue {
    pub fn describe(&self) -> String {
        match self {
            WriteValue::Registers { address, words } if words.len() == 1 => {
                format!("holding register {address}")
            }
            WriteValue::Registers { address, words } => format!(
                "holding registers {address}..{}",
                u32::from(*address) + words.len() as u32
            ),
            WriteValue::Coil { address, .. } => format!("coil {address}"),
        }
    }
}

/// Why a write did not take effect (or could not be confirmed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("no modbus device named {0:?}")]
    UnknownDevice(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("link: {0}")]
    Link(String),
    #[error("the device answered exception {0}")]
    Exception(String),
    #[error("read back {read:?} after writing {wrote:?}")]
    ReadBack { wrote: Vec<u16>, read: Vec<u16> },
    #[error("the device's bus task has stopped (gateway stopping or reloading)")]
    Stopped,
}

impl WriteError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            WriteError::UnknownDevice(_) => "unknown_device",
            WriteError::Timeout(_) => "timeout",
            WriteError::Link(_) => "io",
            WriteError::Exception(_) => "exception",
            WriteError::ReadBack { .. } => "readback_mismatch",
            WriteError::Stopped => "stopped",
        }
    }
}

/// A write for one unit of a bus, and where its answer goes.
pub(crate) struct WriteJob {
    pub(crate) unit: usize,
    pub(crate) value: WriteValue,
    pub(crate) reply: oneshot::Sender<Result<(), WriteError>>,
}

/// Writes to the devices of the running buses. Cheap to clone.
#[derive(Clone, Default)]
pub struct ModbusWriter {
    /// Device name → its bus and its index there.
    devices: Arc<HashMap<String, (mpsc::Sender<WriteJob>, usize)>>,
}

/// Writes queued per bus before a writer waits.
pub(crate) const WRITE_QUEUE: usize = 16;

impl ModbusWriter {
    pub(crate) fn new(devices: HashMap<String, (mpsc::Sender<WriteJob>, usize)>) -> Self {
        Self {
            devices: Arc::new(devices),
        }
    }

    pub fn has_device(&self, device: &str) -> bool {
        self.devices.contains_key(device)
    }

    /// Writes `value` to `device` and reads it back: `Ok` only if the device
    /// took the write and now holds exactly what was written.
    pub async fn write(&self, device: &str, value: WriteValue) -> Result<(), WriteError> {
        let (bus, unit) = self
            .devices
            .get(device)
            .ok_or_else(|| WriteError::UnknownDevice(device.to_owned()))?;
        let (reply, answer) = oneshot::channel();
        bus.send(WriteJob {
            unit: *unit,
            value,
            reply,
        })
        .await
        .map_err(|_| WriteError::Stopped)?;
        answer.await.map_err(|_| WriteError::Stopped)?
    }
}
