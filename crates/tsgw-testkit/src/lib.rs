//! One test kit for tsgw's end-to-end tests (`tests/e2e`) and `tsgw-bench`:
//! the ThingSpeak emulator in-process over TLS, a gateway config pointed at
//! it, the real `tsgw` binary as a child process (bound ports read from its
//! JSON log), Prometheus scrapes, and MQTT devices (rumqttc clients and
//! `mosquitto_pub -l`).
//!
//! Everything returns [`anyhow::Result`] with a message naming what failed;
//! every wait is bounded by a timeout; every listener binds port 0.

mod config;
mod device;
mod emulator;
mod gateway;
mod metrics;
mod mosquitto;
mod raw;

use std::time::Duration;

pub use config::{GatewayConfig, Rest};
pub use device::{AckedDevice, Device};
pub use emulator::{
    channel, crypto, delivered, emulator, emulator_builder, wait_for_delivery, write_key,
    Delivered, CHANNELS, CLIENT_ID, PASSWORD, USERNAME,
};
pub use gateway::{tsgw_binary, Gateway};
pub use metrics::{http_get, http_get_with, metric_sum, metric_value};
pub use mosquitto::mosquitto_pub_lines;
pub use raw::{qos0_burst, raw_connect};

/// Upper bound for a device's connect to the gateway's local broker.
pub const CONNECT_WAIT: Duration = Duration::from_secs(30);
