//! Config parsing: TOML text → each stage's public config section, then its
//! validation (GatewayConfig itself is private to the binary; it is only
//! these sections side by side), then what the gateway derives from a
//! section that validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = toml::from_str::<tsgw_mqtt::MqttSourceConfig>(text) {
        let _ = tsgw_mqtt::validate(&c);
    }
    if let Ok(c) = toml::from_str::<tsgw_forwarder::UpstreamConfig>(text) {
        // The gateway derives intervals only from a validated config (a
        // negative interval is refused there, with its key).
        if c.validate().is_ok() {
            let _ = c.intervals();
            let _ = c.renew_idle_after();
        }
    }
    if let Ok(c) = toml::from_str::<tsgw_queue::QueueConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(c) = toml::from_str::<tsgw_serial::SerialPortConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(c) = toml::from_str::<tsgw_modbus::ModbusDeviceConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(f) = toml::from_str::<tsgw_core::extract::PayloadFormat>(text) {
        if let Ok(channel) = tsgw_core::ChannelId::new(1) {
            let _ = tsgw_core::extract::Extractor::compile(&f, channel);
        }
    }
});
