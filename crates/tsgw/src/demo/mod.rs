//! `tsgw demo`: the whole flow on one machine, no hardware, no account.
//!
//! ```text
//! simulated MQTT devices ─┐
//! simulated serial device ─┼─► gateway (real, TLS upstream) ─► thingspeak-emulator
//! simulated Modbus PLC ───┘
//! ```
//! It prints what each device sends and what entries arrive on the
//! "ThingSpeak" side, live, until Ctrl-C.

mod devices;

use std::time::Duration;

use anyhow::Context;
use thingspeak::ChannelId;
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator};
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::gateway::Gateway;

/// Three demo channels: one fed by MQTT devices, one by the serial and Modbus
/// devices, and one written in the cloud whose setpoints go down to the PLC.
pub const MQTT_CHANNEL: u64 = 100_001;
pub const WIRED_CHANNEL: u64 = 100_002;
pub const CONTROL_CHANNEL: u64 = 100_003;
/// Short enough to see data quickly; the emulator enforces the same interval
/// ThingSpeak would, so any update the gateway sent too fast would be lost.
const INTERVAL: Duration = Duration::from_secs(3);

pub async fn run(seconds: Option<u64>) -> anyhow::Result<()> {
    crate::ops::logging::init("warn", crate::config::LogFormat::Text);
    crate::install_crypto_provider();
    let work = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mqtt_channel = ChannelId::new(MQTT_CHANNEL)?;
    let wired_channel = ChannelId::new(WIRED_CHANNEL)?;
    let control_channel = ChannelId::new(CONTROL_CHANNEL)?;

    let emulator = Emulator::builder()
        .tls("127.0.0.1:0")
        .http("127.0.0.1:0")
        .default_interval(INTERVAL)
        .channel(ChannelSpec::new(
            mqtt_channel,
            "DEMOWRITEKEY0001",
            "DEMOREADKEY00001",
        ))
        .channel(ChannelSpec::new(
            wired_channel,
            "DEMOWRITEKEY0002",
            "DEMOREADKEY00002",
        ))
        .channel(ChannelSpec::new(
            control_channel,
            "DEMOWRITEKEY0003",
            "DEMOREADKEY00003",
        ))
        .device(DeviceSpec::new(
            "tsgw-demo",
            "tsgw-demo",
            "demo-password",
            [mqtt_channel, wired_channel, control_channel],
        ))
        .ca_out(work.path().join("emulator-ca.pem"))
        .start()
        .await
        .context("cannot start the ThingSpeak emulator")?;
    let emulator = std::sync::Arc::new(emulator);
    let tls = emulator
        .tls_addr()
        .context("emulator has no TLS listener")?;
    let ca_file = emulator
        .ca_file()
        .context("emulator wrote no CA file")?
        .to_path_buf();

    let serial = devices::SerialDevice::open()?;
    let modbus = devices::ModbusDevice::start().await?;

    let config_text = format!(
        r#"
[upstream]
host = "127.0.0.1"
port = {port}
transport = "tls"
ca_file = {ca:?}
client_id = "tsgw-demo"
username = "tsgw-demo"
password = "demo-password"
update_interval_secs = {interval}
# The demo's emulator serves no REST reads (never reach api.thingspeak.com).
read_api = false

[queue]
dir = {queue:?}

[mqtt]
listen = "127.0.0.1:0"

# The simulated ESP board publishes drop-in to this channel.
[mqtt.drop_in]
channels = [{mqtt_channel}]

[[mqtt.rules]]
name = "garden-sensor"
topic = "garden/+/climate"
channel = {mqtt_channel}
parser = {{ format = "json", fields = {{ "/soil" = "field3", "/light" = "field4" }} }}

[[serial]]
name = "arduino"
path = {serial_path:?}
channel = {wired_channel}
exclusive = false
parser = {{ format = "key_value", fields = {{ t = "field1", h = "field2" }} }}

[[modbus]]
name = "plc"
unit_id = 1
channel = {wired_channel}
poll_interval_ms = 2000
timeout_ms = 500
retries = 1
max_gap = 0
transport.tcp.address = "{modbus_addr}"
points = [
  {{ name = "tank-temperature", kind = "holding", address = 0, type = "i16", scale = 0.1, target = "field3" }},
]

# A setpoint written to the control channel in the cloud goes to the PLC's
# holding register 1 (tenths of °C), read back; outside 15..30 °C it is refused.
[[downlink]]
name = "plc-setpoint"
channel = {control_channel}
source = "field1"
min = 15
max = 30
action.modbus = {{ device = "plc", kind = "holding", address = 1, type = "i16", scale = 0.1 }}

[http]
listen = "127.0.0.1:0"
"#,
        port = tls.port(),
        ca = ca_file.display().to_string(),
        interval = INTERVAL.as_secs_f64(),
        queue = work.path().join("queue").display().to_string(),
        serial_path = serial.path.display().to_string(),
        modbus_addr = modbus.addr,
    );
    let config: GatewayConfig =
        toml::from_str(&config_text).context("the demo's own config is invalid")?;
    config.validate()?;
    let gateway = Gateway::start(config).await?;
    let mqtt = gateway
        .mqtt_addr()
        .context("gateway has no MQTT listener")?;

    println!("tsgw demo");
    println!("  ThingSpeak emulator  mqtts://{tls}  (channels {MQTT_CHANNEL}, {WIRED_CHANNEL}; one update per {}s each)", INTERVAL.as_secs());
    println!(
        "  gateway MQTT broker  mqtt://{mqtt}   metrics http://{}/metrics",
        gateway.http_addr()
    );
    println!("  devices: esp-kitchen (drop-in ThingSpeak topic), garden-sensor (JSON rule), arduino (serial, t=..,h=..), plc (Modbus TCP)");
    println!("  downlink: setpoints written to channel {CONTROL_CHANNEL} in the cloud go to the plc's holding register 1 (15..30 °C; others refused)");
    println!("  Ctrl-C stops.\n");

    let stop = CancellationToken::new();
    let mut tasks = devices::spawn_all(mqtt, serial, modbus, stop.clone()).await?;
    tasks.push(devices::spawn_cloud_setpoints(
        emulator.clone(),
        control_channel,
        stop.clone(),
    ));
    tasks.push(tokio::spawn(devices::print_entries(
        emulator.clone(),
        vec![mqtt_channel, wired_channel],
        stop.clone(),
    )));

    let until = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => println!("\nstopping"),
        _ = until => println!("\ndemo time is up"),
    }
    // The gateway first, so it does not see its devices vanish.
    gateway.shutdown().await;
    stop.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    let counters = emulator.counters();
    println!(
        "emulator: {} updates accepted, {} dropped by the rate limit",
        counters.accepted, counters.dropped_rate_limit
    );
    if let Ok(emulator) = std::sync::Arc::try_unwrap(emulator) {
        emulator.shutdown().await;
    }
    Ok(())
}
