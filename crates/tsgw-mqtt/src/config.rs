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
    /// Admit clients without an account. Off by default, as in mosquitto 2.x:
    /// anyone on the LAN could otherwise write to your channels. A loopback
    /// listener admits them anyway while no account is configured.
    pub allow_anonymous: bool,
    /// Device accounts: `name = "password"`, or a table with `password` and
    /// the account's permissions (see [`AccountConfig`]). Passwords may be
    /// argon2 PHC strings made by `tsgw passwd`. With no accounts, credentials
    /// a device sends are ignored and it connects as anonymous (if admitted).
    pub users: BTreeMap<String, UserConfig>,
    /// What anonymous clients may do (when they are admitted at all).
    pub anonymous: AclConfig,
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
            allow_anonymous: false,
            users: BTreeMap::new(),
            anonymous: AclConfig::default(),
            max_payload_bytes: 16 * 1024,
            max_connections: 1000,
            connect_timeout_ms: 5000,
            drop_in: DropInConfig::default(),
            rules: Vec::new(),
        }
    }
}

/// One entry of `[mqtt.users]`: a bare password (every permission), or an account table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum UserConfig {
    Password(Secret),
    Account(AccountConfig),
}

impl UserConfig {
    pub fn password(&self) -> &Secret {
        match self {
            UserConfig::Password(p) => p,
            UserConfig::Account(a) => &a.password,
        }
    }

    /// The account's permissions; a bare password allows everything.
    pub fn acl(&self) -> AclConfig {
        match self {
            UserConfig::Password(_) => AclConfig::default(),
            UserConfig::Account(a) => AclConfig {
                channels: a.channels.clone(),
                publish: a.publish.clone(),
                subscribe: a.subscribe.clone(),
            },
        }
    }
}

impl From<Secret> for UserConfig {
    fn from(password: Secret) -> Self {
        UserConfig::Password(password)
    }
}

impl<'de> Deserialize<'de> for UserConfig {
    /// A string (or an all-digit password from the environment) is a bare
    /// password; a table is an account, whose unknown keys are errors that
    /// name the key (an untagged enum would only say "did not match").
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UserConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a password, or a table with `password` and permissions")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UserConfig, E> {
                Ok(UserConfig::Password(Secret::new(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UserConfig, E> {
                Ok(UserConfig::Password(Secret::new(v.to_string())))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UserConfig, E> {
                Ok(UserConfig::Password(Secret::new(v.to_string())))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<UserConfig, A::Error> {
                AccountConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(UserConfig::Account)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[mqtt.users.<name>]`: an account with its own permissions.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// The password, or its argon2 PHC string from `tsgw passwd`.
    pub password: Secret,
    /// Drop-in channels this account may publish to (within those the gateway
    /// accepts at all). Omitted: all of them.
    pub channels: Option<Vec<ChannelId>>,
    /// Topic filters this account may publish to outside ThingSpeak's
    /// `channels/...` namespace (rule topics, local traffic). Omitted: all.
    pub publish: Option<Vec<String>>,
    /// Topic filters this account may subscribe to. Omitted: all.
    pub subscribe: Option<Vec<String>>,
}

/// Permissions of a kind of client. `None` means "no restriction".
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    pub channels: Option<Vec<ChannelId>>,
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
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
    /// Channels devices may publish to this way. Empty means the channels the
    /// upstream config names (`[upstream.channels.<id>]`, or the channels of
    /// `[[upstream.connections]]`); publishes to any other are refused.
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
    fn users_are_passwords_or_accounts() {
        let cfg: MqttSourceConfig = toml::from_str(
            r#"
            [users]
            esp = "plain"
            pin = 1234
            [users.plc]
            password = "$argon2id$v=19$m=9216,t=4,p=1$c2FsdHNhbHQ$aGFzaA"
            channels = [42]
            subscribe = ["plc/#"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.users["esp"].password().expose(), "plain");
        assert_eq!(cfg.users["pin"].password().expose(), "1234");
        assert_eq!(cfg.users["esp"].acl(), AclConfig::default());
        let plc = cfg.users["plc"].acl();
        assert_eq!(plc.channels, Some(vec![ChannelId::new(42).unwrap()]));
        assert_eq!(plc.subscribe, Some(vec!["plc/#".to_owned()]));
        assert_eq!(plc.publish, None);
        assert!(!format!("{cfg:?}").contains("plain"));
    }

    #[test]
    fn a_typo_in_an_account_names_the_key() {
        let err = toml::from_str::<MqttSourceConfig>(
            "[users.plc]\npassword = \"x\"\nsubscibe = [\"a\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("subscibe"), "{err}");
    }

    #[test]
    fn unknown_top_level_keys_are_errors() {
        assert!(toml::from_str::<MqttSourceConfig>("lsiten = \"0.0.0.0:1\"").is_err());
    }
}
