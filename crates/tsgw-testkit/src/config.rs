//! The gateway's config TOML for a test or bench run: upstream = the
//! emulator over TLS, local listeners on port 0 (the kit reads the bound
//! addresses from the JSON log), everything else a field with a default.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use thingspeak_emulator::EmulatorHandle;

use crate::emulator::{CHANNELS, CLIENT_ID, PASSWORD, USERNAME};

/// Where the gateway's REST calls (bulk backfill, reads that settle an
/// update in doubt) go: never to api.thingspeak.com.
#[derive(Debug, Clone, PartialEq)]
pub enum Rest {
    /// Nowhere: `read_api = false` (updates in doubt are settled by MQTT evidence only).
    Off,
    /// The emulator's plain HTTP listener on 127.0.0.1 and this port.
    Plain(u16),
    /// The caller sets the `rest_*` keys itself in `upstream_extra`.
    Custom,
}

impl Rest {
    fn keys(&self) -> String {
        match self {
            Rest::Off => "read_api = false\n".into(),
            Rest::Plain(port) => {
                format!("rest_host = \"127.0.0.1\"\nrest_port = {port}\nrest_tls = false\n")
            }
            Rest::Custom => String::new(),
        }
    }
}

/// One gateway config. Build it with [`GatewayConfig::for_emulator`] (or
/// [`GatewayConfig::to_upstream`] when something sits between gateway and
/// emulator), change the public fields, then [`GatewayConfig::write`] it.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// MQTT-over-TLS port on 127.0.0.1 (the emulator's certificate covers that address).
    pub upstream_port: u16,
    /// The emulator's CA, trusted by the gateway.
    pub ca_file: PathBuf,
    pub interval_secs: f64,
    pub keep_alive_secs: u64,
    /// `reconnect_min_secs`, `reconnect_max_secs`.
    pub reconnect_secs: (f64, f64),
    pub rest: Rest,
    /// More `[upstream]` keys (`key = value` lines).
    pub upstream_extra: String,
    pub queue_dir: PathBuf,
    pub flush_interval_ms: u64,
    /// `queue.max_bytes`; the gateway's default when `None`.
    pub max_bytes: Option<u64>,
    /// `mqtt.listen`.
    pub mqtt_listen: String,
    /// `mqtt.max_connections`; the gateway's default when `None`.
    pub max_connections: Option<usize>,
    /// `mqtt.drop_in.channels`: the channels drop-in publishes may write
    /// (the gateway refuses others); all of [`CHANNELS`] by default.
    pub drop_in_channels: Vec<u64>,
    pub ready_upstream_grace_secs: u64,
    /// Appended at the end: `[[mqtt.rules]]`, `[[serial]]`, overrides.
    pub extra: String,
}

impl GatewayConfig {
    /// Upstream = `emulator`'s TLS listener, REST calls to its plain HTTP
    /// listener if it has one (else none); the queue in `queue_dir`.
    pub fn for_emulator(emulator: &EmulatorHandle, queue_dir: &Path) -> Result<GatewayConfig> {
        let tls = emulator
            .tls_addr()
            .context("emulator has no TLS listener")?;
        let ca = emulator.ca_file().context("emulator has no CA file")?;
        let mut config = Self::to_upstream(tls.port(), ca, queue_dir);
        if let Some(http) = emulator.http_addr() {
            config.rest = Rest::Plain(http.port());
        }
        Ok(config)
    }

    /// Upstream = TLS on 127.0.0.1:`port` (a relay in front of the emulator),
    /// trusting `ca_file`; no REST calls.
    pub fn to_upstream(port: u16, ca_file: &Path, queue_dir: &Path) -> GatewayConfig {
        GatewayConfig {
            upstream_port: port,
            ca_file: ca_file.to_path_buf(),
            interval_secs: 1.0,
            keep_alive_secs: 5,
            reconnect_secs: (0.2, 1.0),
            rest: Rest::Off,
            upstream_extra: String::new(),
            queue_dir: queue_dir.to_path_buf(),
            flush_interval_ms: 200,
            max_bytes: None,
            mqtt_listen: "127.0.0.1:0".into(),
            max_connections: None,
            drop_in_channels: CHANNELS.to_vec(),
            ready_upstream_grace_secs: 2,
            extra: String::new(),
        }
    }

    pub fn to_toml(&self) -> String {
        let optional = |key: &str, value: Option<String>| {
            value.map(|v| format!("{key} = {v}\n")).unwrap_or_default()
        };
        format!(
            r#"
[upstream]
host = "127.0.0.1"
port = {port}
transport = "tls"
ca_file = {ca:?}
client_id = "{CLIENT_ID}"
username = "{USERNAME}"
password = "{PASSWORD}"
update_interval_secs = {interval:?}
keep_alive_secs = {keep_alive}
reconnect_min_secs = {reconnect_min:?}
reconnect_max_secs = {reconnect_max:?}
{rest}{upstream_extra}

[queue]
dir = {queue:?}
flush_interval_ms = {flush}
{max_bytes}
[mqtt]
listen = {listen:?}
{max_connections}
[mqtt.drop_in]
channels = {drop_in:?}

[http]
listen = "127.0.0.1:0"
ready_upstream_grace_secs = {grace}

[log]
level = "info"
format = "json"
{extra}
"#,
            port = self.upstream_port,
            ca = self.ca_file.display().to_string(),
            interval = self.interval_secs,
            keep_alive = self.keep_alive_secs,
            reconnect_min = self.reconnect_secs.0,
            reconnect_max = self.reconnect_secs.1,
            rest = self.rest.keys(),
            upstream_extra = self.upstream_extra,
            queue = self.queue_dir.display().to_string(),
            flush = self.flush_interval_ms,
            max_bytes = optional("max_bytes", self.max_bytes.map(|b| b.to_string())),
            listen = self.mqtt_listen,
            max_connections = optional(
                "max_connections",
                self.max_connections.map(|c| c.to_string())
            ),
            drop_in = self.drop_in_channels,
            grace = self.ready_upstream_grace_secs,
            extra = self.extra,
        )
    }

    /// Writes the config as `gateway.toml` in `dir`; returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("gateway.toml");
        std::fs::write(&path, self.to_toml())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_keys_appear_only_when_set() {
        let mut config = GatewayConfig::to_upstream(8883, Path::new("/ca.pem"), Path::new("/q"));
        let text = config.to_toml();
        assert!(!text.contains("max_bytes"), "{text}");
        assert!(text.contains("read_api = false\n"), "{text}");
        assert!(!text.contains("rest_host"), "{text}");
        assert!(!text.contains("max_connections"), "{text}");
        assert!(text.contains("port = 8883\n"), "{text}");
        assert!(text.contains("update_interval_secs = 1.0\n"), "{text}");
        assert!(
            text.contains("[mqtt.drop_in]\nchannels = [1001, 1002, 1003]\n"),
            "{text}"
        );
        config.max_bytes = Some(1024);
        config.max_connections = Some(7);
        config.mqtt_listen = "127.0.0.1:1883".into();
        config.rest = Rest::Plain(8080);
        let text = config.to_toml();
        assert!(
            text.contains("rest_host = \"127.0.0.1\"\nrest_port = 8080\nrest_tls = false\n"),
            "{text}"
        );
        assert!(!text.contains("read_api"), "{text}");
        assert!(text.contains("max_bytes = 1024\n"), "{text}");
        assert!(text.contains("max_connections = 7\n"), "{text}");
        assert!(text.contains("listen = \"127.0.0.1:1883\"\n"), "{text}");
    }
}
