//! The installer's tools: `tsgw probe modbus`, `tsgw probe serial` and
//! `tsgw check-config --test`. Each talks to a device once through the
//! gateway's own source code, so what they show is what the gateway gets.

pub mod devices;
pub mod modbus;
pub mod serial;
