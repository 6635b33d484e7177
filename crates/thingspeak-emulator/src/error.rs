//! Errors of starting and configuring the emulator.

use std::path::{Path, PathBuf};

/// Why the emulator could not be configured or started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("channels file {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("invalid emulator setting: {0}")]
    Invalid(String),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

impl Error {
    pub(crate) fn file(path: &Path, source: std::io::Error) -> Self {
        Error::File {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn bind(
        what: &'static str,
        addr: impl std::fmt::Display,
        source: std::io::Error,
    ) -> Self {
        Error::Bind {
            what,
            addr: addr.to_string(),
            source,
        }
    }
}
