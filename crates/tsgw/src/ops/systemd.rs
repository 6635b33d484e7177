//! `Type=notify` and `WatchdogSec=` support. Without `NOTIFY_SOCKET` (not under
//! systemd) every call here is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::health::Health;

/// Tells systemd the pipeline is up.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        warn!(error = %e, "cannot notify systemd of readiness");
    }
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Feeds the watchdog at half its interval, but only while the pipeline makes
/// progress: a hung gateway stops feeding it and systemd restarts it.
pub fn spawn_watchdog(health: Health, shutdown: CancellationToken) {
    let Some(timeout) = watchdog_timeout() else {
        return;
    };
    let period = timeout / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if health.is_progressing() {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            } else {
                debug!("pipeline is not progressing; withholding the watchdog ping");
            }
        }
    });
}

/// `WATCHDOG_USEC` as set by systemd for this process, if any.
fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}
