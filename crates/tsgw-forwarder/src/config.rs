//! The `[upstream]` configuration: where ThingSpeak is, how to reach it, and
//! how often each channel may be updated.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thingspeak::{ChannelId, Target};
use tsgw_core::Secret;

use crate::batch::{Aggregate, Policies};
use crate::error::ForwarderError;

/// What happens to windows that piled up while ThingSpeak was unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backfill {
    /// Newest window over MQTT, older ones through the REST bulk-write call
    /// (needs the channel's `write_key`; without one the channel uses `mqtt`).
    #[default]
    Bulk,
    /// Every window over MQTT, oldest first; when more than
    /// `downsample_after` windows wait, the oldest are merged into one update.
    Mqtt,
    /// Only the newest window is sent; older ones are dropped (counted).
    Newest,
}

impl Backfill {
    pub fn as_str(self) -> &'static str {
        match self {
            Backfill::Bulk => "bulk",
            Backfill::Mqtt => "mqtt",
            Backfill::Newest => "newest",
        }
    }
}

/// How the connection to the broker is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT over TLS (port 8883).
    #[default]
    Tls,
    /// MQTT over WebSocket over TLS (port 443, path `/mqtt`).
    Wss,
    /// Plain MQTT (port 1883). Unencrypted: only when configured explicitly.
    Tcp,
    /// MQTT over plain WebSocket (port 80). Unencrypted: only when configured explicitly.
    Ws,
}

impl Transport {
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 8883,
            Transport::Wss => 443,
            Transport::Tcp => 1883,
            Transport::Ws => 80,
        }
    }

    pub fn is_encrypted(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Wss => "wss",
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
}

/// How a connection authenticates, and so which topics it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    /// An MQTT device of the current API (client id, username, password):
    /// `channels/<id>/publish`, `channels/<id>/subscribe`.
    #[default]
    Device,
    /// The legacy API: the channel's write key in the publish topic
    /// (`channels/<id>/publish/<writeKey>`); username/password optional (any
    /// username plus the account's MQTT API key allows subscribing with
    /// `channels/<id>/subscribe/json/<readKey>`).
    Legacy,
}

impl Auth {
    pub fn as_str(self) -> &'static str {
        match self {
            Auth::Device => "device",
            Auth::Legacy => "legacy",
        }
    }
}

/// One more credential set with the channels it serves (one connection each).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionConfig {
    #[serde(deserialize_with = "string_or_number")]
    pub client_id: String,
    #[serde(deserialize_with = "string_or_number")]
    pub username: String,
    pub password: Secret,
    pub auth: Auth,
    /// Channel ids this connection writes; no channel may be in two connections.
    pub channels: Vec<ChannelId>,
}

/// Settings for one channel that differ from the defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelOverride {
    /// Minimum seconds between two updates of this channel.
    pub update_interval_secs: Option<f64>,
    /// Aggregation per target (`field1` .. `field8`, `status`, `lat`, `long`,
    /// `elevation`), over `upstream.aggregate`.
    pub aggregate: BTreeMap<String, Aggregate>,
    /// The channel's Write API key: needed for bulk backfill over REST and
    /// for legacy auth.
    pub write_key: Option<Secret>,
    /// The channel's Read API key: the REST read API answers with it whether
    /// an update in doubt was stored (a public channel needs none), and legacy
    /// auth subscribes with it to confirm. A secret: masked, never logged.
    pub read_key: Option<Secret>,
}

/// Connection to ThingSpeak and the update schedule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub host: String,
    /// Defaults by transport: tls 8883, wss 443, tcp 1883, ws 80.
    pub port: Option<u16>,
    pub transport: Transport,
    /// A PEM file of CA certificates trusted in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// The MQTT device's client id, username and password (from the ThingSpeak UI).
    #[serde(deserialize_with = "string_or_number")]
    pub client_id: String,
    #[serde(deserialize_with = "string_or_number")]
    pub username: String,
    pub password: Secret,
    /// `device` (default) or `legacy` (write key in the topic).
    pub auth: Auth,
    /// More credential sets, one connection each, for the channels they list.
    /// The credentials above (if set) serve every channel not listed here.
    pub connections: Vec<ConnectionConfig>,
    pub keep_alive_secs: u64,
    /// Minimum seconds between two updates of one channel (free licence: 15).
    pub update_interval_secs: f64,
    /// Reconnect backoff bounds, seconds.
    pub reconnect_min_secs: f64,
    pub reconnect_max_secs: f64,
    /// Per-channel overrides, keyed by channel id.
    pub channels: BTreeMap<String, ChannelOverride>,
    /// Aggregation per target for every channel (default: last value).
    pub aggregate: BTreeMap<String, Aggregate>,
    /// Count an update as delivered only when ThingSpeak relays it back on the
    /// channel's subscription (falls back to "written" where subscribing is refused).
    pub confirm: bool,
    /// Seconds to wait for that echo before checking and resending.
    pub confirm_timeout_secs: f64,
    /// Ask ThingSpeak's REST read API (`feeds.json` at `rest_host`, with the
    /// channel's `read_key`, none for a public channel) whether an update in
    /// doubt after a restart was stored. Off: the MQTT evidence alone.
    pub read_api: bool,
    /// Publish an update that sets a single field to the field-feed topic
    /// (`channels/<id>/publish/fields/field<n>`, bare value). Such a publish
    /// carries no created_at, so it needs `confirm = false`.
    pub field_topics: bool,
    /// The broker closes connections without PUBLISH for this long; the
    /// forwarder renews the connection at 5/6 of it.
    pub idle_timeout_secs: f64,
    /// What to do with a backlog of windows after an outage.
    pub backfill: Backfill,
    /// `backfill = "mqtt"`: more waiting windows than this get merged.
    pub downsample_after: usize,
    /// ThingSpeak's REST API (bulk backfill).
    pub rest_host: String,
    /// Default 443 (or 80 with `rest_tls = false`).
    pub rest_port: Option<u16>,
    /// HTTPS for REST calls. Plain HTTP only when set to false explicitly.
    pub rest_tls: bool,
    /// Minimum seconds between two bulk calls of one channel (ThingSpeak: 15).
    pub bulk_interval_secs: f64,
    /// Most updates in one bulk call (free licence: 960).
    pub bulk_max_updates: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            host: "mqtt3.thingspeak.com".into(),
            port: None,
            transport: Transport::Tls,
            ca_file: None,
            client_id: String::new(),
            username: String::new(),
            password: Secret::default(),
            auth: Auth::Device,
            connections: Vec::new(),
            keep_alive_secs: 60,
            update_interval_secs: 15.0,
            reconnect_min_secs: 1.0,
            reconnect_max_secs: 60.0,
            channels: BTreeMap::new(),
            aggregate: BTreeMap::new(),
            confirm: true,
            confirm_timeout_secs: 10.0,
            read_api: true,
            field_topics: false,
            idle_timeout_secs: 3600.0,
            backfill: Backfill::Bulk,
            downsample_after: 60,
            rest_host: "api.thingspeak.com".into(),
            rest_port: None,
            rest_tls: true,
            bulk_interval_secs: 15.0,
            bulk_max_updates: 960,
        }
    }
}

/// Accepts a number where a string is expected: figment parses environment
/// values, so an all-digit id from `TSGW_UPSTREAM__USERNAME` arrives as an integer.
fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(i64),
        UInt(u64),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::Text(s) => s,
        Raw::Int(n) => n.to_string(),
        Raw::UInt(n) => n.to_string(),
    })
}

fn check_credentials(
    prefix: &str,
    client_id: &str,
    username: &str,
    password: &Secret,
    auth: Auth,
) -> Result<(), ForwarderError> {
    if client_id.is_empty() {
        return Err(bad(
            &format!("{prefix}client_id"),
            "must be set (the MQTT device's client id from ThingSpeak)",
        ));
    }
    if auth == Auth::Legacy {
        // Legacy publishers need no credentials (the write key is in the topic).
        return Ok(());
    }
    if username.is_empty() {
        return Err(bad(
            &format!("{prefix}username"),
            "must be set (the MQTT device's username from ThingSpeak)",
        ));
    }
    if password.is_empty() {
        return Err(bad(
            &format!("{prefix}password"),
            "must be set (the MQTT device's password from ThingSpeak)",
        ));
    }
    Ok(())
}

fn check_policies(key: &str, map: &BTreeMap<String, Aggregate>) -> Result<(), ForwarderError> {
    for target in map.keys() {
        target.parse::<Target>().map_err(|_| {
            bad(
                &format!("{key}.{target}"),
                "is not a target (field1..field8, status, lat, long, elevation)",
            )
        })?;
    }
    Ok(())
}

/// Longest keep-alive MQTT 3.1.1 can express.
const MAX_KEEP_ALIVE_SECS: u64 = u16::MAX as u64;
/// Largest number of seconds accepted anywhere (a day): larger is a typo.
const MAX_SECS: f64 = 86_400.0;

fn bad(key: &str, message: impl Into<String>) -> ForwarderError {
    ForwarderError::Config {
        key: format!("upstream.{key}"),
        message: message.into(),
    }
}

fn check_host(key: &str, host: &str) -> Result<(), ForwarderError> {
    if host.trim().is_empty() {
        return Err(bad(key, "must not be empty"));
    }
    if host.contains(['/', ' ']) {
        return Err(bad(
            key,
            format!("{host:?} must be a host name or address, without scheme or path"),
        ));
    }
    Ok(())
}

fn check_port(key: &str, port: Option<u16>) -> Result<(), ForwarderError> {
    if port == Some(0) {
        return Err(bad(key, "must be 1..65535"));
    }
    Ok(())
}

fn check_secs(key: &str, v: f64, min: f64) -> Result<(), ForwarderError> {
    if !v.is_finite() || v < min || v > MAX_SECS {
        return Err(bad(
            key,
            format!("{v} is not a number of seconds from {min} to {MAX_SECS}"),
        ));
    }
    Ok(())
}

impl UpstreamConfig {
    /// Checks every setting; the error names the offending key.
    pub fn validate(&self) -> Result<(), ForwarderError> {
        check_host("host", &self.host)?;
        check_port("port", self.port)?;
        if self.has_primary() {
            check_credentials(
                "",
                &self.client_id,
                &self.username,
                &self.password,
                self.auth,
            )?;
        }
        let mut seen = BTreeMap::new();
        for (i, c) in self.connections.iter().enumerate() {
            let prefix = format!("connections[{i}].");
            check_credentials(&prefix, &c.client_id, &c.username, &c.password, c.auth)?;
            if c.channels.is_empty() {
                return Err(bad(
                    &format!("{prefix}channels"),
                    "must list at least one channel id",
                ));
            }
            for ch in &c.channels {
                if let Some(j) = seen.insert(*ch, i) {
                    return Err(bad(
                        &format!("{prefix}channels"),
                        format!("channel {ch} is already served by connections[{j}]"),
                    ));
                }
                if c.auth == Auth::Legacy && self.write_key(*ch).is_none() {
                    return Err(bad(
                        &format!("channels.\"{ch}\".write_key"),
                        format!("must be set: connections[{i}] uses legacy auth (write key in the topic)"),
                    ));
                }
            }
        }
        if self.keep_alive_secs == 0 || self.keep_alive_secs > MAX_KEEP_ALIVE_SECS {
            return Err(bad(
                "keep_alive_secs",
                format!(
                    "{} is not from 1 to {MAX_KEEP_ALIVE_SECS}",
                    self.keep_alive_secs
                ),
            ));
        }
        check_secs("update_interval_secs", self.update_interval_secs, 0.1)?;
        check_secs("reconnect_min_secs", self.reconnect_min_secs, 0.01)?;
        check_secs("reconnect_max_secs", self.reconnect_max_secs, 0.01)?;
        if self.reconnect_max_secs < self.reconnect_min_secs {
            return Err(bad(
                "reconnect_max_secs",
                format!(
                    "{} is less than reconnect_min_secs {}",
                    self.reconnect_max_secs, self.reconnect_min_secs
                ),
            ));
        }
        check_policies("aggregate", &self.aggregate)?;
        check_secs("confirm_timeout_secs", self.confirm_timeout_secs, 0.1)?;
        if self.field_topics && self.confirm {
            return Err(bad(
                "field_topics",
                "needs confirm = false: a field-feed publish carries no created_at, so its echo \
                 cannot be matched and a resend cannot be deduplicated",
            ));
        }
        check_secs("idle_timeout_secs", self.idle_timeout_secs, 1.0)?;
        check_secs("bulk_interval_secs", self.bulk_interval_secs, 0.1)?;
        if self.downsample_after == 0 {
            return Err(bad("downsample_after", "must be at least 1"));
        }
        if self.bulk_max_updates == 0 || self.bulk_max_updates > 14_400 {
            return Err(bad(
                "bulk_max_updates",
                format!("{} is not from 1 to 14400", self.bulk_max_updates),
            ));
        }
        check_host("rest_host", &self.rest_host)?;
        check_port("rest_port", self.rest_port)?;
        for (id, o) in &self.channels {
            let key = format!("channels.{id:?}");
            id.parse::<ChannelId>()
                .map_err(|e| bad(&key, e.to_string()))?;
            if let Some(secs) = o.update_interval_secs {
                check_secs(&format!("{key}.update_interval_secs"), secs, 0.1)?;
            }
            check_policies(&format!("{key}.aggregate"), &o.aggregate)?;
            if let Some(k) = &o.write_key {
                thingspeak::WriteKey::new(k.expose()).map_err(|e| {
                    bad(
                        &format!("{key}.write_key"),
                        format!("not a write API key: {e}"),
                    )
                })?;
            }
            if let Some(k) = &o.read_key {
                thingspeak::ReadKey::new(k.expose()).map_err(|e| {
                    bad(
                        &format!("{key}.read_key"),
                        format!("not a read API key: {e}"),
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The aggregation policies of `channel`: its own over the global ones.
    /// Call after [`validate`](Self::validate).
    pub fn policies(&self, channel: ChannelId) -> Policies {
        let own = self
            .channels
            .iter()
            .filter(|(id, _)| id.parse::<ChannelId>().ok() == Some(channel))
            .flat_map(|(_, o)| o.aggregate.iter());
        let by_target = self
            .aggregate
            .iter()
            .chain(own)
            .filter_map(|(t, a)| Some((t.parse::<Target>().ok()?, *a)))
            .collect();
        Policies { by_target }
    }

    /// True when the top-level credentials make a connection: always without
    /// `[[upstream.connections]]`, otherwise when `client_id` is set.
    pub fn has_primary(&self) -> bool {
        self.connections.is_empty() || !self.client_id.is_empty()
    }

    /// Channels served by the extra connections.
    pub fn listed_channels(&self) -> std::collections::BTreeSet<ChannelId> {
        self.connections
            .iter()
            .flat_map(|c| c.channels.iter().copied())
            .collect()
    }

    /// The config one connection runs with: `index` None for the top-level
    /// credentials, else the `connections` entry. Call after validate.
    pub fn for_connection(&self, index: Option<usize>) -> UpstreamConfig {
        let mut c = self.clone();
        if let Some(extra) = index.and_then(|i| self.connections.get(i)) {
            c.client_id = extra.client_id.clone();
            c.username = extra.username.clone();
            c.password = extra.password.clone();
            c.auth = extra.auth;
        }
        c.connections.clear();
        c
    }

    /// The read API key of `channel`, if configured.
    pub fn read_key(&self, channel: ChannelId) -> Option<thingspeak::ReadKey> {
        self.channels
            .iter()
            .find(|(id, _)| id.parse::<ChannelId>().ok() == Some(channel))
            .and_then(|(_, o)| o.read_key.as_ref())
            .and_then(|k| thingspeak::ReadKey::new(k.expose()).ok())
    }

    /// The write API key of `channel`, if configured.
    pub fn write_key(&self, channel: ChannelId) -> Option<thingspeak::WriteKey> {
        self.channels
            .iter()
            .find(|(id, _)| id.parse::<ChannelId>().ok() == Some(channel))
            .and_then(|(_, o)| o.write_key.as_ref())
            .and_then(|k| thingspeak::WriteKey::new(k.expose()).ok())
    }

    pub fn rest_port(&self) -> u16 {
        self.rest_port
            .unwrap_or(if self.rest_tls { 443 } else { 80 })
    }

    /// Renew a connection idle this long (5/6 of the broker's idle limit).
    pub fn renew_idle_after(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout_secs * 5.0 / 6.0)
    }

    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(self.transport.default_port())
    }

    /// The minimum interval for every channel with an override, and the default.
    /// Call after [`validate`](Self::validate).
    pub fn intervals(&self) -> (Duration, BTreeMap<ChannelId, Duration>) {
        let default = Duration::from_secs_f64(self.update_interval_secs);
        let overrides = self
            .channels
            .iter()
            .filter_map(|(id, o)| {
                let id = id.parse::<ChannelId>().ok()?;
                let secs = o.update_interval_secs?;
                Some((id, Duration::from_secs_f64(secs)))
            })
            .collect();
        (default, overrides)
    }

    /// Name used in the `connection` metric label and logs.
    pub fn connection_name(&self) -> String {
        format!("{}:{}", self.host, self.effective_port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> UpstreamConfig {
        UpstreamConfig {
            client_id: "c".into(),
            username: "u".into(),
            password: Secret::new("p"),
            ..UpstreamConfig::default()
        }
    }

    #[test]
    fn partial_toml_uses_defaults() {
        let c: UpstreamConfig = toml::from_str(
            r#"
            client_id = "dev"
            username = "user"
            password = "pw"
            transport = "wss"
            [channels.1234]
            update_interval_secs = 1
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.host, "mqtt3.thingspeak.com");
        assert_eq!(c.effective_port(), 443);
        assert_eq!(c.keep_alive_secs, 60);
        let (default, overrides) = c.intervals();
        assert_eq!(default, Duration::from_secs(15));
        assert_eq!(
            overrides[&ChannelId::new(1234).unwrap()],
            Duration::from_secs(1)
        );
    }

    #[test]
    fn new_keys_parse_and_resolve_per_channel() {
        let c: UpstreamConfig = toml::from_str(
            r#"
            client_id = "dev"
            username = "user"
            password = "pw"
            aggregate = { field1 = "mean", field2 = "max" }
            confirm = false
            confirm_timeout_secs = 3
            idle_timeout_secs = 600
            backfill = "newest"
            rest_host = "api.example.net"
            [channels.1234]
            update_interval_secs = 1
            aggregate = { field1 = "sum" }
            write_key = "ABCDEFGH12345678"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let ch = ChannelId::new(1234).unwrap();
        let f = |n| Target::Field(thingspeak::Field::new(n).unwrap());
        let p = c.policies(ch);
        assert_eq!(p.get(f(1)), Aggregate::Sum, "channel overrides global");
        assert_eq!(p.get(f(2)), Aggregate::Max);
        assert_eq!(p.get(f(3)), Aggregate::Last);
        let other = c.policies(ChannelId::new(9).unwrap());
        assert_eq!(other.get(f(1)), Aggregate::Mean);
        assert_eq!(c.write_key(ch).unwrap().expose(), "ABCDEFGH12345678");
        assert!(c.write_key(ChannelId::new(9).unwrap()).is_none());
        assert_eq!(c.backfill, Backfill::Newest);
        assert_eq!(c.rest_port(), 443);
        assert_eq!(c.renew_idle_after(), Duration::from_secs(500));
        assert!(!format!("{c:?}").contains("ABCDEFGH12345678"));
        let d = UpstreamConfig::default();
        assert!(d.confirm);
        assert_eq!(d.backfill, Backfill::Bulk);
        assert_eq!(d.renew_idle_after(), Duration::from_secs(3000));
    }

    #[test]
    fn extra_connections_and_legacy_auth() {
        let c: UpstreamConfig = toml::from_str(
            r#"
            [[connections]]
            client_id = "a"
            username = "ua"
            password = "pa"
            channels = [1, 2]
            [[connections]]
            client_id = "legacy-gw"
            auth = "legacy"
            channels = [3]
            [channels.3]
            write_key = "WRITEKEY3"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert!(!c.has_primary(), "no top-level credentials");
        assert_eq!(c.listed_channels().len(), 3);
        let second = c.for_connection(Some(1));
        assert_eq!(second.auth, Auth::Legacy);
        assert_eq!(second.client_id, "legacy-gw");
        assert!(second.connections.is_empty());

        let mut dup = c.clone();
        dup.connections[1].channels.push(ChannelId::new(2).unwrap());
        match dup.validate() {
            Err(ForwarderError::Config { key, message }) => {
                assert_eq!(key, "upstream.connections[1].channels");
                assert!(message.contains("connections[0]"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let mut nokey = c.clone();
        nokey.channels.clear();
        match nokey.validate() {
            Err(ForwarderError::Config { key, .. }) => {
                assert_eq!(key, "upstream.channels.\"3\".write_key")
            }
            other => panic!("{other:?}"),
        }
        let mut nopw = c;
        nopw.connections[0].password = Secret::default();
        match nopw.validate() {
            Err(ForwarderError::Config { key, .. }) => {
                assert_eq!(key, "upstream.connections[0].password")
            }
            other => panic!("{other:?}"),
        }
    }

    /// The documented snippet (README) parses and validates, with the
    /// commented keys switched on.
    #[test]
    fn documented_keys_parse() {
        let text = format!(
            "client_id = \"c\"\nusername = \"u\"\npassword = \"p\"\n{}",
            include_str!("../tests/data/upstream-keys.toml")
                .replace("[upstream.", "[")
                .replace("[[upstream.", "[[")
                .lines()
                .map(|l| l
                    .strip_prefix("# ")
                    .filter(|k| {
                        // A commented-out key or table, not prose.
                        k.starts_with('[')
                            || k.split_once(" = ").is_some_and(|(name, _)| {
                                name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                            })
                    })
                    .unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let c: UpstreamConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        c.validate().unwrap();
        assert!(c.confirm);
        assert_eq!(c.connections.len(), 1);
        assert_eq!(c.aggregate.len(), 2);
    }

    #[test]
    fn numeric_ids_are_accepted_as_text() {
        let c: UpstreamConfig =
            toml::from_str("client_id = 123\nusername = 456\npassword = 789").unwrap();
        assert_eq!((c.client_id.as_str(), c.username.as_str()), ("123", "456"));
        assert_eq!(c.password.expose(), "789");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<UpstreamConfig>("hots = \"x\"").is_err());
        assert!(toml::from_str::<UpstreamConfig>("transport = \"quic\"").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        type Mutation = Box<dyn Fn(&mut UpstreamConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.host = String::new()), "upstream.host"),
            (Box::new(|c| c.host = "mqtts://x".into()), "upstream.host"),
            (Box::new(|c| c.port = Some(0)), "upstream.port"),
            (Box::new(|c| c.client_id.clear()), "upstream.client_id"),
            (Box::new(|c| c.username.clear()), "upstream.username"),
            (
                Box::new(|c| c.password = Secret::default()),
                "upstream.password",
            ),
            (
                Box::new(|c| c.keep_alive_secs = 0),
                "upstream.keep_alive_secs",
            ),
            (
                Box::new(|c| c.update_interval_secs = f64::NAN),
                "upstream.update_interval_secs",
            ),
            (
                Box::new(|c| c.reconnect_max_secs = 0.5),
                "upstream.reconnect_max_secs",
            ),
            (
                Box::new(|c| {
                    c.aggregate.insert("field9".into(), Aggregate::Mean);
                }),
                "upstream.aggregate.field9",
            ),
            (
                Box::new(|c| c.confirm_timeout_secs = 0.0),
                "upstream.confirm_timeout_secs",
            ),
            (Box::new(|c| c.field_topics = true), "upstream.field_topics"),
            (
                Box::new(|c| c.idle_timeout_secs = 0.5),
                "upstream.idle_timeout_secs",
            ),
            (
                Box::new(|c| c.downsample_after = 0),
                "upstream.downsample_after",
            ),
            (
                Box::new(|c| c.rest_host = "https://x".into()),
                "upstream.rest_host",
            ),
            (
                Box::new(|c| {
                    c.channels.insert(
                        "7".into(),
                        ChannelOverride {
                            write_key: Some(Secret::new("")),
                            ..ChannelOverride::default()
                        },
                    );
                }),
                "upstream.channels.\"7\".write_key",
            ),
            (
                Box::new(|c| {
                    c.channels.insert("abc".into(), ChannelOverride::default());
                }),
                "upstream.channels.\"abc\"",
            ),
            (
                Box::new(|c| {
                    c.channels.insert(
                        "7".into(),
                        ChannelOverride {
                            update_interval_secs: Some(-1.0),
                            ..ChannelOverride::default()
                        },
                    );
                }),
                "upstream.channels.\"7\".update_interval_secs",
            ),
        ];
        for (mutate, key) in cases {
            let mut c = valid();
            mutate(&mut c);
            match c.validate() {
                Err(ForwarderError::Config { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected error for {key}, got {other:?}"),
            }
        }
        valid().validate().unwrap();
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = UpstreamConfig {
            password: Secret::new("hunter2"),
            ..valid()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
