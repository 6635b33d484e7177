//! Configuration of the MQTT source: the embedded broker's listeners and the
//! rules that turn local topics into readings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thingspeak::ChannelId;
use tsgw_core::extract::PayloadFormat;
use tsgw_core::Secret;

/// `[mqtt]` in the gateway config.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSourceConfig {
    /// Plain MQTT listener for local devices. Omit (or set `enabled = false`) to disable.
    pub listen: Option<SocketAddr>,
    /// Optional MQTT over TLS listener.
    pub tls: Option<BrokerTlsConfig>,
    /// Optional MQTT over WebSocket listener (path-agnostic, subprotocol `mqtt`).
    pub websocket_listen: Option<SocketAddr>,
    /// Device accounts: username → password. Empty means devices connect without credentials.
    pub users: BTreeMap<String, Secret>,
    /// Largest accepted publish payload; bigger packets close that client only.
    pub max_payload_bytes: usize,
    /// Most simultaneous device connections. Each holds 3 open files: a limit
    /// (RLIMIT_NOFILE) too low for them lowers this at startup, with a warning.
    pub max_connections: usize,
    /// A client that opens TCP (or finishes its TLS handshake) but is not connected
    /// (CONNACK) within this time is dropped and counted in
    /// `tsgw_device_errors_total{kind="connect_timeout"}`.
    pub connect_timeout_ms: u16,
    /// Devices written for ThingSpeak publish to the gateway unchanged.
    pub drop_in: DropInConfig,
    /// Mapping rules for devices that publish their own topics and payloads.
    pub rules: Vec<RuleConfig>,
}

impl Default for MqttSourceConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
            tls: None,
            websocket_listen: None,
            users: BTreeMap::new(),
            max_payload_bytes: 16 * 1024,
            max_connections: 1000,
            connect_timeout_ms: 5000,
            drop_in: DropInConfig::default(),
            rules: Vec::new(),
        }
    }
}

/// `[mqtt.tls]`: a TLS listener for devices that can do TLS.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain presented to devices.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
    /// A device that does not finish the TLS handshake within this time is dropped.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

/// `[mqtt.drop_in]`: accept ThingSpeak's own topics (`channels/<id>/publish...`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DropInConfig {
    pub enabled: bool,
    /// Channels devices may publish to this way. Empty means any channel.
    pub channels: Vec<ChannelId>,
}

impl Default for DropInConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            channels: Vec::new(),
        }
    }
}

/// `[[mqtt.rules]]`: messages on `topic` are parsed by `format` into `channel`'s targets.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Names the rule in logs and metrics (the `device` label).
    pub name: String,
    /// MQTT topic filter; `+` and `#` wildcards allowed.
    pub topic: String,
    /// Channel for destinations that do not name their own.
    pub channel: ChannelId,
    /// The payload format and its mapping: `{ format = "plain" | "json" | "key_value" | "csv" | "regex", ... }`,
    /// the same shape as a serial port's `parser`.
    pub parser: PayloadFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_read_from_toml_with_a_parser_table() {
        let cfg: MqttSourceConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:1883"
            [[rules]]
            name = "climate"
            topic = "sensors/+/climate"
            channel = 42
            parser = { format = "json", fields = { "/t" = "field1", "/h" = { target = "field2", scale = 0.1 } } }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.rules.len(), 1);
        assert!(matches!(cfg.rules[0].parser, PayloadFormat::Json { .. }));
    }

    #[test]
    fn unknown_keys_in_a_rule_are_errors() {
        let err = toml::from_str::<MqttSourceConfig>(
            r#"
            [[rules]]
            name = "x"
            topic = "a"
            channel = 1
            parser = { format = "plain", target = "field1", tagret = "field2" }
            "#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("tagret"), "{err}");
    }

    #[test]
    fn unknown_top_level_keys_are_errors() {
        assert!(toml::from_str::<MqttSourceConfig>("lsiten = \"0.0.0.0:1\"").is_err());
    }
}
