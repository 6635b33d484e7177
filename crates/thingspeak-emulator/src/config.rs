//! Channels, devices and account keys: from the library API or a TOML/JSON file.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thingspeak::ChannelId;

use crate::error::Error;

/// One emulated channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelSpec {
    pub id: ChannelId,
    /// Write API key: legacy topic publishes, `/update.json`, bulk updates.
    pub write_key: String,
    /// Read API key for legacy subscriptions. `None` makes the channel public:
    /// legacy subscriptions then need no key.
    pub read_key: Option<String>,
    /// Minimum time between two accepted updates; `None` uses the emulator default.
    pub interval: Option<Duration>,
}

impl ChannelSpec {
    /// A private channel with a write key and a read key.
    pub fn new(id: ChannelId, write_key: impl Into<String>, read_key: impl Into<String>) -> Self {
        Self {
            id,
            write_key: write_key.into(),
            read_key: Some(read_key.into()),
            interval: None,
        }
    }

    /// Overrides the emulator's default minimum update interval for this channel.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Makes the channel public: legacy subscriptions need no read key.
    pub fn public(mut self) -> Self {
        self.read_key = None;
        self
    }
}

/// An MQTT device (ThingSpeak's current API): credentials plus the channels
/// it may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub channels: Vec<ChannelId>,
}

impl DeviceSpec {
    pub fn new(
        client_id: impl Into<String>,
        username: impl Into<String>,
        password: impl Into<String>,
        channels: impl IntoIterator<Item = ChannelId>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            username: username.into(),
            password: password.into(),
            channels: channels.into_iter().collect(),
        }
    }
}

/// What a channels file holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelsFile {
    pub channels: Vec<ChannelSpec>,
    pub devices: Vec<DeviceSpec>,
    /// Legacy account MQTT API keys: a CONNECT with any username and one of
    /// these as password is accepted (for legacy subscriptions).
    pub mqtt_api_keys: Vec<String>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileChannel {
    id: ChannelId,
    write_key: String,
    #[serde(default)]
    read_key: Option<String>,
    /// Seconds; fractions allowed (tests use short intervals).
    #[serde(default)]
    interval_secs: Option<f64>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileDevice {
    client_id: String,
    username: String,
    password: String,
    channels: Vec<ChannelId>,
}

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    #[serde(default)]
    channels: Vec<FileChannel>,
    #[serde(default)]
    devices: Vec<FileDevice>,
    #[serde(default)]
    mqtt_api_keys: Vec<String>,
}

impl ChannelsFile {
    /// Reads a `.json` file as JSON and anything else as TOML.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let config_err = |message: String| Error::Config {
            path: path.to_owned(),
            message,
        };
        let root: FileRoot = if is_json {
            serde_json::from_str(&text).map_err(|e| config_err(e.to_string()))?
        } else {
            toml::from_str(&text).map_err(|e| config_err(e.to_string()))?
        };
        Self::from_root(root).map_err(config_err)
    }

    /// Parses TOML text (the default format of channels files).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let root: FileRoot = toml::from_str(text).map_err(|e| e.to_string())?;
        Self::from_root(root)
    }

    fn from_root(root: FileRoot) -> Result<Self, String> {
        let mut channels = Vec::with_capacity(root.channels.len());
        for c in root.channels {
            let interval = match c.interval_secs {
                None => None,
                Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
                Some(s) => {
                    return Err(format!(
                        "channels[id={}].interval_secs = {s} is not a non-negative number",
                        c.id
                    ))
                }
            };
            channels.push(ChannelSpec {
                id: c.id,
                write_key: c.write_key,
                read_key: c.read_key,
                interval,
            });
        }
        let devices = root
            .devices
            .into_iter()
            .map(|d| DeviceSpec {
                client_id: d.client_id,
                username: d.username,
                password: d.password,
                channels: d.channels,
            })
            .collect();
        let file = Self {
            channels,
            devices,
            mqtt_api_keys: root.mqtt_api_keys,
        };
        validate(&file.channels, &file.devices)?;
        Ok(file)
    }
}

/// Checks what serde cannot: duplicates, empty keys, devices naming unknown channels.
pub(crate) fn validate(channels: &[ChannelSpec], devices: &[DeviceSpec]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for c in channels {
        if !seen.insert(c.id) {
            return Err(format!("channel {} is defined twice", c.id));
        }
        // Keys travel in topics and forms: they must be what ThingSpeak issues.
        thingspeak::WriteKey::new(c.write_key.as_str())
            .map_err(|e| format!("channel {}: write_key: {e}", c.id))?;
        if let Some(read_key) = &c.read_key {
            thingspeak::ReadKey::new(read_key.as_str()).map_err(|e| {
                format!(
                    "channel {}: read_key: {e} (omit it for a public channel)",
                    c.id
                )
            })?;
        }
    }
    let mut client_ids = std::collections::BTreeSet::new();
    for d in devices {
        if d.client_id.is_empty() || d.username.is_empty() || d.password.is_empty() {
            return Err(format!(
                "device {:?}: client_id, username and password must all be non-empty",
                d.client_id
            ));
        }
        if !client_ids.insert(d.client_id.as_str()) {
            return Err(format!("device {:?} is defined twice", d.client_id));
        }
        for ch in &d.channels {
            if !seen.contains(ch) {
                return Err(format!(
                    "device {:?} is authorised for channel {ch}, which is not defined",
                    d.client_id
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
mqtt_api_keys = ["ACCOUNTKEY"]

[[channels]]
id = 1001
write_key = "W1"
read_key = "R1"
interval_secs = 0.5

[[channels]]
id = 1002
write_key = "W2"

[[devices]]
client_id = "dev"
username = "user"
password = "pass"
channels = [1001, 1002]
"#;

    #[test]
    fn toml_file_round_trip() {
        let f = ChannelsFile::from_toml(SAMPLE).unwrap();
        assert_eq!(f.channels.len(), 2);
        assert_eq!(f.channels[0].interval, Some(Duration::from_millis(500)));
        assert_eq!(f.channels[1].read_key, None);
        assert_eq!(f.devices[0].channels.len(), 2);
        assert_eq!(f.mqtt_api_keys, vec!["ACCOUNTKEY".to_string()]);
    }

    #[test]
    fn json_file_is_read_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("channels.json");
        std::fs::write(
            &path,
            r#"{"channels":[{"id":7,"write_key":"W","read_key":"R"}],
                "devices":[{"client_id":"c","username":"u","password":"p","channels":[7]}]}"#,
        )
        .unwrap();
        let f = ChannelsFile::load(&path).unwrap();
        assert_eq!(f.channels[0].id.get(), 7);
    }

    #[test]
    fn example_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("channels.example.toml");
        let f = ChannelsFile::load(&path).unwrap();
        assert_eq!((f.channels.len(), f.devices.len()), (2, 1));
        assert_eq!(f.channels[1].read_key, None);
    }

    #[test]
    fn errors_name_the_offender() {
        let unknown = SAMPLE.replace("channels = [1001, 1002]", "channels = [1001, 1003]");
        let err = ChannelsFile::from_toml(&unknown).unwrap_err();
        assert!(err.contains("1003") && err.contains("dev"), "{err}");

        let twice = format!("{SAMPLE}\n[[channels]]\nid = 1001\nwrite_key = \"X\"\n");
        assert!(ChannelsFile::from_toml(&twice)
            .unwrap_err()
            .contains("1001"));

        let bad_key = SAMPLE.replace("write_key = \"W2\"", "write_key = \"W-2\"");
        let err = ChannelsFile::from_toml(&bad_key).unwrap_err();
        assert!(err.contains("1002") && err.contains("write_key"), "{err}");

        let typo = SAMPLE.replace("write_key = \"W2\"", "writekey = \"W2\"");
        assert!(ChannelsFile::from_toml(&typo)
            .unwrap_err()
            .contains("writekey"));

        let zero = SAMPLE.replace("id = 1002", "id = 0");
        assert!(ChannelsFile::from_toml(&zero).is_err());
    }
}
