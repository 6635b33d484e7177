//! What surrounds the pipeline: the HTTP endpoint and its status page, systemd
//! integration, logging and memory tuning.

pub mod health;
pub mod http;
pub mod logging;
pub mod memory;
pub mod status;
pub mod systemd;
