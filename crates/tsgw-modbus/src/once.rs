//! One-shot reads for the installer's tools, through the same code as the
//! poller: [`read_block`] for `tsgw probe modbus` (one raw block, decoded by
//! the caller in every type and order), [`poll_once`] for
//! `tsgw check-config --test` (one poll cycle of a configured device, its
//! readings collected instead of queued).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tsgw_core::{Metrics, Reading};

use crate::bus::{Bus, Unit};
use crate::config::{ModbusDeviceConfig, ModbusTransport, RegisterKind};
use crate::decode::BlockData;
use crate::link::{Endpoint, Failure, Outcome};
use crate::plan::ReadBlock;
use crate::ModbusError;

/// Why a one-shot read returned no data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open {endpoint}: {message}")]
    Open { endpoint: String, message: String },
    #[error("no answer within {0:?} (wrong unit id, address, baud rate or wiring?)")]
    Timeout(Duration),
    #[error("the device answered with exception {code:#04x} {name} ({description})")]
    Exception {
        code: u8,
        name: String,
        description: &'static str,
    },
    #[error("{kind}: {message}")]
    Failed { kind: &'static str, message: String },
}

/// The exception's name, code and meaning, as the Modbus spec names them.
pub fn exception_error(code: ExceptionCode) -> ReadError {
    let description = match code {
        ExceptionCode::IllegalFunction => "the device does not support this read for this table",
        ExceptionCode::IllegalDataAddress => "no such register or coil at this address and count",
        ExceptionCode::IllegalDataValue => {
            "the count or value is out of the range the device accepts"
        }
        ExceptionCode::ServerDeviceFailure => "the device failed while answering",
        ExceptionCode::Acknowledge => "the device accepted a long-running request",
        ExceptionCode::ServerDeviceBusy => "the device is busy; try again",
        ExceptionCode::MemoryParityError => "the device found a memory parity error",
        ExceptionCode::GatewayPathUnavailable => "the gateway has no path to this unit id",
        ExceptionCode::GatewayTargetDevice => "the unit behind the gateway did not answer",
        ExceptionCode::Custom(_) => "a code outside the Modbus specification",
    };
    let name = match code {
        ExceptionCode::Custom(n) => format!("Custom({n})"),
        other => format!("{other:?}"),
    };
    ReadError::Exception {
        code: u8::from(code),
        name,
        description,
    }
}

/// Reads `count` items of `kind` from `start` on unit `unit_id` once, with
/// a `timeout` for the connect and for the answer.
pub async fn read_block(
    transport: &ModbusTransport,
    unit_id: u8,
    kind: RegisterKind,
    start: u16,
    count: u16,
    timeout: Duration,
) -> Result<BlockData, ReadError> {
    let endpoint = Endpoint::from(transport);
    let mut ctx = endpoint.open(timeout).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            ReadError::Timeout(timeout)
        } else {
            ReadError::Open {
                endpoint: endpoint.label().to_owned(),
                message: e.to_string(),
            }
        }
    })?;
    ctx.set_slave(Slave(unit_id));
    let block = ReadBlock {
        kind,
        start,
        count,
        points: Vec::new(),
    };
    let outcome = endpoint.read(&mut ctx, &block, timeout).await;
    {
        use tokio_modbus::client::Client as _;
        let _ = tokio::time::timeout(Duration::from_secs(1), ctx.disconnect()).await;
    }
    match outcome {
        Outcome::Data(data) => Ok(data),
        Outcome::Exception(code) => Err(exception_error(code)),
        Outcome::Failed(Failure::Timeout, _) => Err(ReadError::Timeout(timeout)),
        Outcome::Failed(failure, message) => Err(ReadError::Failed {
            kind: failure.kind(),
            message,
        }),
    }
}

/// What one poll cycle of a device produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PollReport {
    /// The readings the gateway would have queued.
    pub readings: Vec<Reading>,
    /// Whether the unit answered at all (data or an exception).
    pub answered: bool,
    /// What went wrong, in words: exceptions of single blocks, or why the unit
    /// did not answer.
    pub problems: Vec<String>,
}

/// Polls a configured device once, as the gateway does (same blocks, retries,
/// timeouts and decoding), and returns its readings instead of queueing them.
pub async fn poll_once(device: &ModbusDeviceConfig) -> Result<PollReport, ModbusError> {
    device.validate()?;
    let metrics = Metrics::new();
    // Room for every reading of the cycle: nothing waits on a reader.
    let (readings, mut collected) = mpsc::channel(device.points.len().max(1));
    let mut bus = Bus::new(
        Endpoint::from(&device.transport),
        vec![Unit::new(device)],
        readings,
        metrics.clone(),
    );
    let problems = bus.poll_once_for_report(0).await;
    bus.close().await;
    drop(bus);
    let mut out = Vec::new();
    while let Some(reading) = collected.recv().await {
        out.push(reading);
    }
    let answered = metrics
        .device_up
        .with_label_values(&["modbus", &device.name])
        .get()
        > 0;
    Ok(PollReport {
        readings: out,
        answered,
        problems,
    })
}
