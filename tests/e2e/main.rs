//! End-to-end tests: the real `tsgw` binary between rumqttc devices and the
//! ThingSpeak emulator over TLS, all on loopback.

mod common;

mod config_errors;
mod delivery;
mod devices;
mod disk_full;
mod downlink;
mod durability;
mod field_tools;
mod in_doubt;
mod local_broker;
mod operations;
mod status_page;
