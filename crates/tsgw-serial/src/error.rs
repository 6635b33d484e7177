//! Errors of the serial source's configuration.

/// A serial port's configuration is unusable. Every variant names the port
/// (and the key) so `tsgw check-config` can point at the exact line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SerialError {
    #[error("serial port {port:?}: {key}: {message}")]
    Config {
        port: String,
        key: String,
        message: String,
    },
    #[error("serial port name {0:?} is used by more than one port")]
    DuplicateName(String),
    #[error("serial ports {first:?} and {second:?} both use path {path:?}")]
    DuplicatePath {
        first: String,
        second: String,
        path: String,
    },
}

impl SerialError {
    pub(crate) fn config(port: &str, key: &str, message: impl Into<String>) -> Self {
        SerialError::Config {
            port: port.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}
