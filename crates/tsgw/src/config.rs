//! The gateway's configuration: one TOML file plus `TSGW_` environment
//! variables plus systemd credentials, merged by figment in that order.
//!
//! Every section belongs to the stage that uses it (each stage crate defines
//! and documents its own struct); this file only assembles them and checks
//! the whole before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use tsgw_core::Secret;
use tsgw_forwarder::UpstreamConfig;
use tsgw_modbus::ModbusDeviceConfig;
use tsgw_mqtt::MqttSourceConfig;
use tsgw_queue::QueueConfig;
use tsgw_serial::SerialPortConfig;

mod describe;

/// The config file commands read when not given one (`--config`, `TSGW_CONFIG`).
pub const DEFAULT_CONFIG: &str = "/etc/tsgw/gateway.toml";

/// Prefix of environment variables that override config keys
/// (`TSGW_UPSTREAM__PASSWORD` sets `upstream.password`).
pub const ENV_PREFIX: &str = "TSGW_";

/// Environment variables with the prefix that are not config keys:
/// `TSGW_CONFIG` (the file), `TSGW_HTTP_PASSWORD` (`tsgw tail --user`) and
/// the writer's test hook `TSGW_TEST_WRITER_DELAY_MS`.
const NON_CONFIG_ENV: &[&str] = &["config", "http_password", "test_writer_delay_ms"];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where ThingSpeak is and how to reach it.
    pub upstream: UpstreamConfig,
    /// The durable on-disk queue.
    #[serde(default)]
    pub queue: QueueConfig,
    /// The embedded MQTT broker for local devices, and its mapping rules.
    #[serde(default)]
    pub mqtt: MqttSourceConfig,
    /// Serial-line devices.
    #[serde(default)]
    pub serial: Vec<SerialPortConfig>,
    /// Modbus RTU and TCP devices.
    #[serde(default)]
    pub modbus: Vec<ModbusDeviceConfig>,
    /// Rules acting on entries written to ThingSpeak channels (setpoints,
    /// on/off): Modbus writes, serial commands, local MQTT publishes.
    #[serde(default)]
    pub downlink: Vec<crate::downlink::DownlinkRule>,
    /// The HTTP endpoint for Prometheus and health checks.
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The status page (`/`), `tsgw tail`'s feed (`/tail`), `/metrics`,
    /// `/healthz` and `/readyz`. Localhost only unless changed here.
    pub listen: SocketAddr,
    /// `/readyz` fails when upstream has not been connected for this long.
    pub ready_upstream_grace_secs: u64,
    /// Who may see the status page and the tail feed (HTTP Basic):
    /// `name = "<hash from tsgw passwd>"` (a plain password works too). None:
    /// open to anyone who reaches `listen`. `/metrics` and the health checks
    /// stay open either way, for Prometheus and systemd.
    pub users: BTreeMap<String, Secret>,
    /// How often the status page reloads itself, seconds.
    pub refresh_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9184)),
            ready_upstream_grace_secs: 300,
            users: BTreeMap::new(),
            refresh_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, or per module (`info,tsgw_forwarder=debug`).
    /// `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl GatewayConfig {
    /// Reads `path` (which must exist), then the environment, then systemd credentials.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let figment = Self::figment(path)?;
        let config: GatewayConfig = figment.extract().map_err(|e| {
            let credentials = credentials_dir().map(|dir| {
                let names = credentials().unwrap_or_default();
                (dir, names.into_iter().map(|(name, _)| name).collect())
            });
            let origins = describe::Origins {
                env_prefix: ENV_PREFIX,
                credentials: credentials
                    .as_ref()
                    .map(|(dir, names): &(PathBuf, Vec<String>)| (dir.as_path(), names.clone())),
            };
            anyhow::anyhow!(describe::describe(e, &origins))
        })?;
        config.check().map_err(|invalid| invalid.in_file(path))?;
        Ok(config)
    }

    fn figment(path: &Path) -> anyhow::Result<Figment> {
        if !path.exists() {
            bail!("config file {} does not exist", path.display());
        }
        let mut figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__").ignore(NON_CONFIG_ENV));
        for (key, value) in credentials()? {
            figment = figment.merge(Serialized::default(&key, value));
        }
        Ok(figment)
    }

    /// Checks what serde cannot: cross-field rules, compilable parsers, reachable files.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.check().map_err(|invalid| invalid.error)
    }

    /// [`validate`](Self::validate), with the table each error is about.
    fn check(&self) -> Result<(), Invalid> {
        let at = |table: &[&str]| {
            let table: Vec<String> = table.iter().map(|s| (*s).to_owned()).collect();
            move |error: anyhow::Error| Invalid { table, error }
        };
        self.upstream
            .validate()
            .context("invalid [upstream] section")
            .map_err(at(&["upstream"]))?;
        tsgw_mqtt::validate(&self.mqtt).map_err(|e| Invalid {
            table: mqtt_table(&e),
            error: anyhow::Error::new(e).context("invalid [mqtt] section"),
        })?;
        for (i, port) in self.serial.iter().enumerate() {
            port.validate()
                .with_context(|| format!("invalid [[serial]] #{} ({:?})", i + 1, port.name))
                .map_err(at(&["serial", &i.to_string()]))?;
        }
        for (i, device) in self.modbus.iter().enumerate() {
            device
                .validate()
                .with_context(|| format!("invalid [[modbus]] #{} ({:?})", i + 1, device.name))
                .map_err(at(&["modbus", &i.to_string()]))?;
        }
        let mut names = std::collections::HashSet::new();
        let devices = (self.serial.iter().enumerate())
            .map(|(i, p)| (&p.name, "serial", i))
            .chain(
                self.modbus
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (&d.name, "modbus", i)),
            );
        for (name, section, i) in devices {
            if !names.insert(name) {
                return Err(at(&[section, &i.to_string()])(anyhow::anyhow!(
                    "device name {name:?} is used twice: names label metrics and logs, so they must be unique across [[serial]] and [[modbus]]"
                )));
            }
        }
        crate::downlink::config::validate(&self.downlink, &self.modbus, &self.serial)
            .map_err(|(i, e)| at(&["downlink", &i.to_string()])(anyhow::anyhow!(e)))?;
        crate::ops::status::auth::Users::validate(&self.http.users)
            .map_err(|e| at(&["http", "users"])(anyhow::anyhow!(e)))?;
        if !(1..=3600).contains(&self.http.refresh_secs) {
            return Err(at(&["http", "refresh_secs"])(anyhow::anyhow!(
                "http.refresh_secs = {} is outside 1..=3600",
                self.http.refresh_secs
            )));
        }
        if self.queue.max_bytes == 0 {
            return Err(at(&["queue", "max_bytes"])(anyhow::anyhow!(
                "queue.max_bytes must be above 0"
            )));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(at(&["log", "level"])(anyhow::anyhow!(
                "log.level {:?} is not a valid tracing filter",
                self.log.level
            )));
        }
        Ok(())
    }

    /// The config as TOML, secrets masked: what `check-config` prints.
    pub fn to_masked_toml(&self) -> anyhow::Result<String> {
        toml::to_string_pretty(self).context("cannot render the config as TOML")
    }
}

/// A failed check, and the config table it is about (`["serial", "0"]`):
/// the file's line for that table tells the user where to look.
struct Invalid {
    table: Vec<String>,
    error: anyhow::Error,
}

impl Invalid {
    /// The error, prefixed with `file, line N` where the table is written in
    /// `file` (a table set only from the environment has no line: no prefix).
    fn in_file(self, file: &Path) -> anyhow::Error {
        let line = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| describe::line_of(&text, &self.table));
        match line {
            // One message, not a context chain: a plain `{}` (the reload's
            // log line) would show only the outermost context.
            Some(line) => anyhow::anyhow!("{}, line {line}: {:#}", file.display(), self.error),
            None => self.error,
        }
    }
}

/// The table of `[mqtt]` an error is about.
fn mqtt_table(e: &tsgw_mqtt::MqttSourceError) -> Vec<String> {
    use tsgw_mqtt::auth::AccountError;
    use tsgw_mqtt::rules::RuleError;
    use tsgw_mqtt::MqttSourceError;
    let path = |p: &[&str]| p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    match e {
        MqttSourceError::Rule(
            RuleError::Filter { index, .. }
            | RuleError::Format { index, .. }
            | RuleError::EmptyName { index },
        ) => path(&["mqtt", "rules", &index.to_string()]),
        MqttSourceError::Account(
            AccountError::BadHash { user, .. } | AccountError::EmptyPassword { user },
        ) => path(&["mqtt", "users", user]),
        // `mqtt.users.plc.publish`: the deepest part the file has is found.
        MqttSourceError::Account(AccountError::Acl(acl)) => {
            acl.key.split('.').map(str::to_owned).collect()
        }
        MqttSourceError::Tls(_) => path(&["mqtt", "tls"]),
        _ => path(&["mqtt"]),
    }
}

/// systemd `LoadCredential=` files: each file in `$CREDENTIALS_DIRECTORY` named
/// like a dotted key (`upstream.password`) sets that key, so secrets need not
/// sit in the world-readable config file.
fn credentials() -> anyhow::Result<Vec<(String, String)>> {
    let Some(dir) = credentials_dir() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read CREDENTIALS_DIRECTORY {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let value = std::fs::read_to_string(entry.path())
            .with_context(|| format!("cannot read credential {name}"))?;
        out.push((name, value.trim_end_matches(['\r', '\n']).to_owned()));
    }
    out.sort();
    Ok(out)
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const MINIMAL: &str = r#"
        [upstream]
        client_id = "abc"
        username = "abc"
        password = "secret-pw"
        [queue]
        dir = "/tmp/x"
    "#;

    fn example() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/gateway.example.toml");
        std::fs::read_to_string(path).unwrap()
    }

    fn parse_and_validate(text: &str) -> GatewayConfig {
        let config: GatewayConfig = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .unwrap_or_else(|e| panic!("{e}"));
        config.validate().unwrap_or_else(|e| panic!("{e:#}"));
        config
    }

    #[test]
    fn the_example_config_parses_and_validates() {
        let config = parse_and_validate(&example());
        assert_eq!(config.mqtt.rules.len(), 2);
        assert!(config.serial.is_empty());
    }

    #[test]
    fn the_examples_marked_optional_parse_and_validate_too() {
        let enabled = example().replace("#~ ", "");
        let config = parse_and_validate(&enabled);
        assert_eq!(config.serial.len(), 2);
        assert_eq!(config.modbus.len(), 2);
        assert_eq!(config.http.users.len(), 1);
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            &format!("{MINIMAL}\n[http]\nlisten = \"127.0.0.1:1\"\nlsiten = 3\n"),
        );
        let err = GatewayConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("lsiten"), "{err}");
    }

    /// `load`'s error for `MINIMAL` plus `extra`, and the file's path.
    fn load_error(extra: &str) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &format!("{MINIMAL}{extra}"));
        let err = GatewayConfig::load(&path).unwrap_err();
        (format!("{err:#}"), path.display().to_string())
    }

    #[test]
    fn validation_errors_name_the_file_and_the_line_of_their_table() {
        // `extra` starts on MINIMAL's last line, line 8 (after its indent).
        let serial = |name: &str, baud: u32| {
            format!(
                "[[serial]]\nname = \"{name}\"\npath = \"/dev/ttyUSB0\"\nchannel = 1\nbaud = {baud}\n\
                 parser = {{ format = \"plain\", target = \"field1\" }}\n"
            )
        };
        let (err, path) = load_error(&format!("{}{}", serial("a", 9600), serial("b", 0)));
        assert!(
            err.starts_with(&format!("{path}, line 14: invalid [[serial]] #2 (\"b\"): ")),
            "{err}"
        );
        assert!(err.contains("baud: must be greater than 0"), "{err}");

        // The second of two devices of one name is at fault.
        let (err, path) = load_error(&format!("{}{}", serial("a", 9600), serial("a", 9600)));
        assert!(
            err.starts_with(&format!("{path}, line 14: device name \"a\" is used twice")),
            "{err}"
        );

        let (err, path) = load_error(
            "[[mqtt.rules]]\nname = \"ok\"\ntopic = \"a\"\nchannel = 1\n\
             parser = { format = \"plain\", target = \"field1\" }\n\
             [[mqtt.rules]]\nname = \"r\"\ntopic = \"a/#/b\"\nchannel = 1\n\
             parser = { format = \"plain\", target = \"field1\" }\n",
        );
        assert!(
            err.starts_with(&format!(
                "{path}, line 13: invalid [mqtt] section: mqtt.rules[1] (\"r\").topic"
            )),
            "{err}"
        );

        // A key of a table written earlier in the file: its own line.
        let (err, path) = load_error("[http]\nrefresh_secs = 0\n");
        assert!(
            err.starts_with(&format!("{path}, line 9: http.refresh_secs = 0")),
            "{err}"
        );
    }

    #[test]
    fn a_missing_named_file_is_an_error() {
        let err = GatewayConfig::load(Path::new("/nonexistent/gateway.toml")).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, MINIMAL);
        let figment = GatewayConfig::figment(&path).unwrap();
        let config: GatewayConfig = figment.extract().unwrap();
        let text = config.to_masked_toml().unwrap();
        assert!(!text.contains("secret-pw"), "{text}");
        assert!(!format!("{config:?}").contains("secret-pw"));
    }
}
