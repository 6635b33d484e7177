//! What surrounds the pipeline: the HTTP endpoint, systemd integration and logging.

pub mod health;
pub mod http;
pub mod logging;
pub mod systemd;
