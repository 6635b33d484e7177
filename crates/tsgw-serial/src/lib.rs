//! Serial-line source: reads text lines from serial devices (USB adapters,
//! Arduinos, RS-232 loggers), parses them with a configured [`PayloadFormat`]
//! and sends the values on as [`Reading`]s.
//!
//! Each port runs in its own task and survives its device: end-of-file or an
//! I/O error closes the port, which is reopened with exponential backoff, so
//! an unplugged adapter neither stops the gateway nor burns a core. See the
//! crate's README for the config and a worked example.
//!
//! [`once`] opens a port by hand for the installer's tools (`tsgw probe
//! serial`, `tsgw check-config --test`).
//!
//! [`PayloadFormat`]: tsgw_core::extract::PayloadFormat

mod backoff;
mod config;
mod error;
mod escape;
/// The bounded line framer, public for the fuzz target `serial_framing`; not
/// needed to run ports (see [`spawn_ports`]).
pub mod framing;
pub mod once;
mod port;

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading};

mod command;
pub use command::{CommandError, SerialWriter};
pub use config::{DataBits, FlowControl, Parity, PollConfig, SerialPortConfig, StopBits};
pub use error::SerialError;

/// Validates every port, then starts one task per port.
///
/// Nothing is started if any port's config is invalid, two ports share a name
/// or a path. A port whose device is missing is not an error: its task keeps
/// retrying. Tasks end when `shutdown` is cancelled or `readings` is closed.
/// Must be called from within a tokio runtime.
pub fn spawn_ports(
    ports: &[SerialPortConfig],
    readings: mpsc::Sender<Reading>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, SerialError> {
    spawn_ports_with_writer(ports, readings, metrics, shutdown).map(|(tasks, _)| tasks)
}

/// [`spawn_ports`], plus a [`SerialWriter`] that writes commands to the
/// ports through their tasks (downlink).
pub fn spawn_ports_with_writer(
    ports: &[SerialPortConfig],
    readings: mpsc::Sender<Reading>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(Vec<JoinHandle<()>>, SerialWriter), SerialError> {
    let mut names = HashMap::new();
    let mut paths: HashMap<&std::path::Path, &str> = HashMap::new();
    let mut tasks = Vec::with_capacity(ports.len());
    let mut writers = HashMap::new();
    for port in ports {
        let resolved = port.resolve()?;
        if names.insert(port.name.as_str(), ()).is_some() {
            return Err(SerialError::DuplicateName(port.name.clone()));
        }
        if let Some(first) = paths.insert(port.path.as_path(), port.name.as_str()) {
            return Err(SerialError::DuplicatePath {
                first: first.to_owned(),
                second: port.name.clone(),
                path: port.path.display().to_string(),
            });
        }
        let (commands_tx, commands_rx) = mpsc::channel(command::COMMAND_QUEUE);
        writers.insert(port.name.clone(), commands_tx);
        tasks.push(
            port::PortTask::new(
                port.clone(),
                resolved,
                readings.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .with_commands(commands_rx),
        );
    }
    let tasks = tasks
        .into_iter()
        .map(|task| tokio::spawn(task.run()))
        .collect();
    Ok((tasks, SerialWriter::new(writers)))
}
