//! What surrounds the pipeline: the HTTP endpoint, systemd integration, logging
//! and memory tuning.

pub mod health;
pub mod http;
pub mod logging;
pub mod memory;
pub mod systemd;
