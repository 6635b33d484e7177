//! `thingspeak-emulator`: a ThingSpeak-compatible MQTT broker and REST endpoint.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use thingspeak_emulator::{ChannelsFile, Emulator};
use tracing_subscriber::EnvFilter;

/// A ThingSpeak-compatible MQTT broker (TCP, TLS, WebSocket, WebSocket over TLS)
/// plus ThingSpeak's REST writes and an inspection/fault API, for tests, demos
/// and offline work. It enforces ThingSpeak's rules: CONNACK 5 for a Will,
/// clean session off or bad credentials; rule-breaking publishes close the
/// connection; updates faster than the channel interval are silently dropped;
/// idle sessions are closed (pings do not count).
///
/// Without any of --mqtt/--mqtts/--ws/--wss, plain MQTT listens on 127.0.0.1:1883.
/// Logs go to stderr (filter with RUST_LOG, default "info").
#[derive(Debug, Parser)]
#[command(name = "thingspeak-emulator", version)]
struct Args {
    /// Channels, devices and MQTT API keys (TOML, or JSON if the name ends in .json).
    #[arg(long, short = 'c', value_name = "FILE")]
    channels: PathBuf,

    /// Plain MQTT listen address (ThingSpeak: 1883). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    mqtt: Option<String>,

    /// MQTT over TLS listen address (ThingSpeak: 8883).
    #[arg(long, value_name = "ADDR")]
    mqtts: Option<String>,

    /// MQTT over WebSocket listen address (path /mqtt, subprotocol mqtt; ThingSpeak: 80).
    #[arg(long, value_name = "ADDR")]
    ws: Option<String>,

    /// MQTT over WebSocket over TLS listen address (ThingSpeak: 443).
    #[arg(long, value_name = "ADDR")]
    wss: Option<String>,

    /// HTTP listen address for /update.json, /channels/<id>/bulk_update.json and /api/*.
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,

    /// HTTPS listen address: the same service as --http over TLS (like api.thingspeak.com).
    #[arg(long, value_name = "ADDR")]
    https: Option<String>,

    /// Seconds without PUBLISH or SUBSCRIBE before a session is closed (min 1; pings do not count).
    #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
    idle_timeout: f64,

    /// Default minimum seconds between accepted updates of a channel (channels may override).
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    interval: f64,

    /// Minimum seconds between bulk_update calls of one channel.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    bulk_interval: f64,

    /// Most updates one bulk_update call may carry.
    #[arg(long, value_name = "N", default_value_t = 960)]
    max_bulk_updates: usize,

    /// Seconds allowed for a TLS/WebSocket handshake and for the CONNECT packet.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    handshake_timeout: f64,

    /// Server certificate chain (PEM). Without --cert/--key a CA and a certificate for
    /// localhost, 127.0.0.1 and ::1 are generated.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// Private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// Where to write the generated CA certificate (PEM) for clients to trust
    /// (e.g. mosquitto_pub --cafile). Default: a temporary file, path logged at start.
    #[arg(long, value_name = "FILE")]
    ca_out: Option<PathBuf>,
}

fn secs(flag: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{flag} {v}: not a non-negative number of seconds"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();

    let file = ChannelsFile::load(&args.channels)?;
    let mut b = Emulator::builder()
        .channels_file(file)
        .idle_timeout(secs("idle-timeout", args.idle_timeout)?)
        .default_interval(secs("interval", args.interval)?)
        .bulk_interval(secs("bulk-interval", args.bulk_interval)?)
        .max_bulk_updates(args.max_bulk_updates)
        .handshake_timeout(secs("handshake-timeout", args.handshake_timeout)?);
    let any_mqtt =
        args.mqtt.is_some() || args.mqtts.is_some() || args.ws.is_some() || args.wss.is_some();
    if !any_mqtt {
        b = b.tcp("127.0.0.1:1883");
    }
    if let Some(a) = args.mqtt {
        b = b.tcp(a);
    }
    if let Some(a) = args.mqtts {
        b = b.tls(a);
    }
    if let Some(a) = args.ws {
        b = b.ws(a);
    }
    if let Some(a) = args.wss {
        b = b.wss(a);
    }
    if let Some(a) = args.http {
        b = b.http(a);
    }
    if let Some(a) = args.https {
        b = b.https(a);
    }
    if let (Some(cert), Some(key)) = (args.cert, args.key) {
        b = b.cert_files(cert, key);
    }
    if let Some(p) = args.ca_out {
        b = b.ca_out(p);
    }
    let emu = b.start().await?;
    if let Some(ca) = emu.ca_file() {
        tracing::info!(path = %ca.display(), "CA certificate for clients written");
    }
    // One JSON line on stdout for scripts and tests: the bound addresses (port 0 resolved).
    let addr = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string());
    let ready = serde_json::json!({
        "mqtt": addr(emu.tcp_addr()),
        "mqtts": addr(emu.tls_addr()),
        "ws": addr(emu.ws_addr()),
        "wss": addr(emu.wss_addr()),
        "http": addr(emu.http_addr()),
        "https": addr(emu.https_addr()),
        "ca_file": emu.ca_file().map(|p| p.display().to_string()),
    });
    println!("{ready}");

    wait_for_signal().await?;
    tracing::info!("stopping");
    emu.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
