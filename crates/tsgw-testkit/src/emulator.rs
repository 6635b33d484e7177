//! The ThingSpeak emulator as every test and bench sees it: three channels
//! with write and read keys, and the gateway's MQTT device account.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use thingspeak::ChannelId;
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator, EmulatorBuilder, EmulatorHandle};

pub const CHANNELS: [u64; 3] = [1001, 1002, 1003];
pub const CLIENT_ID: &str = "gw-client";
pub const USERNAME: &str = "gw-user";
pub const PASSWORD: &str = "gw-password-secret";

/// Channel `id` (one of [`CHANNELS`], or any other non-zero id).
pub fn channel(id: u64) -> ChannelId {
    ChannelId::new(id).expect("test channel ids are non-zero")
}

/// The emulated Write API key of channel `id`.
pub fn write_key(id: u64) -> String {
    format!("WRITEKEY{id:08}")
}

/// Installs ring as the process-wide rustls provider (emulator and clients use rustls).
pub fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An emulator with the three channels and the gateway's device account,
/// rate limit `interval`; the caller adds listeners.
pub fn emulator_builder(interval: Duration) -> EmulatorBuilder {
    let mut builder = Emulator::builder().default_interval(interval);
    for id in CHANNELS {
        builder = builder.channel(ChannelSpec::new(
            channel(id),
            write_key(id),
            format!("READKEY{id:09}"),
        ));
    }
    builder.device(DeviceSpec::new(
        CLIENT_ID,
        USERNAME,
        PASSWORD,
        CHANNELS.map(channel),
    ))
}

/// The emulator with MQTT over TLS (for tsgw), plain TCP (for a mosquitto
/// bridge) and the REST API over plain HTTP, rate limit `interval`.
pub async fn emulator(interval: Duration) -> Result<EmulatorHandle> {
    crypto();
    emulator_builder(interval)
        .tls("127.0.0.1:0")
        .tcp("127.0.0.1:0")
        .http("127.0.0.1:0")
        .start()
        .await
        .map_err(|e| anyhow!("emulator does not start: {e}"))
}

/// Every value each (channel, target) ever had at the emulator, in arrival order.
pub type Delivered = BTreeMap<(u64, String), Vec<String>>;

/// What the emulator stored on [`CHANNELS`], per (channel, target).
pub fn delivered(emulator: &EmulatorHandle) -> Delivered {
    let mut out = Delivered::new();
    for id in CHANNELS {
        for entry in emulator.entries(channel(id)) {
            for target in thingspeak::payload::all_targets() {
                if let Some(v) = entry.get(target) {
                    out.entry((id, target.to_string()))
                        .or_default()
                        .push(v.to_owned());
                }
            }
        }
    }
    out
}

/// Waits until `cond` holds on what was delivered; on timeout the error
/// names `what` and shows what arrived and the emulator's counters.
pub async fn wait_for_delivery(
    emulator: &EmulatorHandle,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Delivered) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = delivered(emulator);
        if cond(&got) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "timed out waiting for {what}; delivered: {got:?}; emulator counters: {:?}",
                emulator.counters()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
