//! Modbus RTU and TCP polling source.
//!
//! Each configured device (a unit id behind a transport) is polled on its own
//! interval; its points are read in as few block requests as the protocol
//! allows ([`plan::plan_reads`]), decoded ([`decode`]) and sent as
//! `tsgw_core::Reading`s.
//!
//! Devices on the same serial path (or TCP address) share one bus task:
//! requests are serialised, and a dead unit is backed off so that it cannot
//! starve the others. Devices on different transports never wait for each
//! other. Device failures (timeouts, exceptions, broken connections) are
//! counted in `tsgw_device_errors_total{source="modbus"}` and never stop other
//! devices; only config errors stop [`spawn_devices`].
//!
//! [`once`] reads a block or polls a device a single time, for the
//! installer's tools (`tsgw probe modbus`, `tsgw check-config --test`).

mod bus;
pub mod config;
pub mod decode;
pub mod encode;
mod error;
mod fresh_input;
mod link;
pub mod once;
pub mod plan;
mod write;

use std::collections::{BTreeMap, HashSet};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading};

pub use config::{
    DataType, ModbusDeviceConfig, ModbusTransport, Parity, PointConfig, RegisterKind, RtuConfig,
    TcpConfig, WordOrder,
};
pub use encode::{encode_value, EncodeError};
pub use error::ModbusError;
pub use write::{ModbusWriter, WriteError, WriteValue};

use bus::{Bus, Unit};
use link::Endpoint;

/// Validates every device and starts one task per bus (per serial path, per TCP
/// address). No I/O happens here: a device that is down at startup is retried by
/// its task. Must be called inside a tokio runtime. The tasks end when
/// `shutdown` is cancelled or `readings` is closed.
pub fn spawn_devices(
    devices: &[ModbusDeviceConfig],
    readings: mpsc::Sender<Reading>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>, ModbusError> {
    spawn_devices_with_writer(devices, readings, metrics, shutdown).map(|(tasks, _)| tasks)
}

/// [`spawn_devices`], plus a [`ModbusWriter`] for writes to the devices
/// (downlink), served by their bus tasks between polls.
pub fn spawn_devices_with_writer(
    devices: &[ModbusDeviceConfig],
    readings: mpsc::Sender<Reading>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(Vec<JoinHandle<()>>, ModbusWriter), ModbusError> {
    let buses = group_into_buses(devices)?;
    let mut writers = std::collections::HashMap::new();
    let tasks = buses
        .into_iter()
        .map(|(endpoint, configs)| {
            let (jobs_tx, jobs_rx) = mpsc::channel(write::WRITE_QUEUE);
            for (index, config) in configs.iter().enumerate() {
                writers.insert(config.name.clone(), (jobs_tx.clone(), index));
            }
            let units = configs.into_iter().map(Unit::new).collect();
            let bus =
                Bus::new(endpoint, units, readings.clone(), metrics.clone()).with_writes(jobs_rx);
            tokio::spawn(bus.run(shutdown.clone()))
        })
        .collect();
    Ok((tasks, ModbusWriter::new(writers)))
}

/// Validates the devices and groups them by the bus they are polled over: one
/// per serial path, one per TCP address (units behind one Modbus TCP gateway share
/// its connection, as most gateways serve one request at a time anyway).
fn group_into_buses(
    devices: &[ModbusDeviceConfig],
) -> Result<Vec<(Endpoint, Vec<&ModbusDeviceConfig>)>, ModbusError> {
    let mut names = HashSet::new();
    let mut buses: BTreeMap<(u8, &str), (Endpoint, Vec<&ModbusDeviceConfig>)> = BTreeMap::new();
    for device in devices {
        device.validate()?;
        if !names.insert(device.name.as_str()) {
            return Err(ModbusError::Device {
                device: device.name.clone(),
                message: "another modbus device has the same name".to_owned(),
            });
        }
        let key = match &device.transport {
            ModbusTransport::Tcp(tcp) => (0, tcp.address.as_str()),
            ModbusTransport::Rtu(rtu) => (1, rtu.path.as_str()),
        };
        let endpoint = Endpoint::from(&device.transport);
        match buses.get_mut(&key) {
            Some((first, members)) => {
                if *first != endpoint {
                    return Err(ModbusError::Device {
                        device: device.name.clone(),
                        message: format!(
                            "shares serial path {:?} with device {:?} but its transport.rtu \
                             settings differ; devices on one bus must use the same settings",
                            key.1, members[0].name
                        ),
                    });
                }
                members.push(device);
            }
            None => {
                buses.insert(key, (endpoint, vec![device]));
            }
        }
    }
    Ok(buses.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, transport: &str) -> ModbusDeviceConfig {
        toml::from_str(&format!(
            r#"
            name = "{name}"
            unit_id = 1
            channel = 1
            {transport}
            points = [{{ kind = "input", address = 0, type = "u16", target = "field1" }}]
            "#
        ))
        .unwrap()
    }

    #[test]
    fn devices_on_one_serial_path_share_a_bus() {
        let devices = [
            device("m1", r#"transport.rtu.path = "/dev/ttyA""#),
            device("plc", r#"transport.tcp.address = "10.0.0.1:502""#),
            device("m2", r#"transport.rtu.path = "/dev/ttyA""#),
            device("m3", r#"transport.rtu.path = "/dev/ttyB""#),
            device("gw-unit-2", r#"transport.tcp.address = "10.0.0.2:502""#),
            device("gw-unit-3", r#"transport.tcp.address = "10.0.0.2:502""#),
        ];
        let buses = group_into_buses(&devices).unwrap();
        let shape: Vec<(String, Vec<&str>)> = buses
            .iter()
            .map(|(e, d)| {
                (
                    e.label().to_owned(),
                    d.iter().map(|d| d.name.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("10.0.0.1:502".to_owned(), vec!["plc"]),
                ("10.0.0.2:502".to_owned(), vec!["gw-unit-2", "gw-unit-3"]),
                ("/dev/ttyA".to_owned(), vec!["m1", "m2"]),
                ("/dev/ttyB".to_owned(), vec!["m3"]),
            ]
        );
    }

    #[test]
    fn conflicting_bus_settings_and_duplicate_names_are_config_errors() {
        let devices = [
            device("m1", r#"transport.rtu.path = "/dev/ttyA""#),
            device(
                "m2",
                r#"transport.rtu = { path = "/dev/ttyA", baud = 19200 }"#,
            ),
        ];
        let msg = group_into_buses(&devices).unwrap_err().to_string();
        assert!(
            msg.contains("m2") && msg.contains("m1") && msg.contains("/dev/ttyA"),
            "{msg}"
        );

        let devices = [
            device("m1", r#"transport.rtu.path = "/dev/ttyA""#),
            device("m1", r#"transport.tcp.address = "h:502""#),
        ];
        let msg = group_into_buses(&devices).unwrap_err().to_string();
        assert!(msg.contains("same name"), "{msg}");
    }
}
