//! Configuration errors: the only errors that stop the Modbus source from starting.
//! Everything a device does at runtime is counted in metrics instead.

/// A Modbus device config that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModbusError {
    #[error("modbus device {device:?}: {message}")]
    Device { device: String, message: String },
    #[error("modbus device {device:?}, {point}: {message}")]
    Point {
        device: String,
        point: String,
        message: String,
    },
}
