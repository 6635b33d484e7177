//! Errors that stop the forwarder. Everything transient (connection loss,
//! refused connects, store hiccups) is retried inside `run` and never surfaces here.

/// A fatal forwarder error.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("config key {key}: {message}")]
    Config { key: String, message: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}
