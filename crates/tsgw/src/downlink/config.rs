//! `[[downlink]]` rules as the user writes them, and their validation.
//!
//! ```toml
//! [[downlink]]
//! name = "boiler-setpoint"
//! channel = 1234567
//! source = "field1"              # field1..field8 or status
//! min = 5.0                      # refused (never clamped) below min or above max
//! max = 30.0
//! min_interval_ms = 5000         # per target: at most one action this often
//! max_age_secs = 300             # entries older than this are refused (after an outage)
//! action.modbus = { device = "boiler-plc", kind = "holding", address = 10, type = "i16", scale = 0.1 }
//! ```

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use thingspeak::{ChannelId, Target};
use tsgw_modbus::{DataType, ModbusDeviceConfig, WordOrder};
use tsgw_serial::SerialPortConfig;

/// One rule: a channel's field (or status) → an action.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkRule {
    /// Unique; labels metrics and logs, keys the state kept on disk.
    pub name: String,
    pub channel: ChannelId,
    /// `field1`..`field8` or `status`: entries that do not set it are ignored.
    pub source: Target,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default = "default_min_interval_ms")]
    pub min_interval_ms: u64,
    #[serde(default = "default_max_age_secs")]
    pub max_age_secs: u64,
    pub action: Action,
}

fn default_min_interval_ms() -> u64 {
    1000
}
fn default_max_age_secs() -> u64 {
    300
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    Modbus(ModbusAction),
    Serial(SerialAction),
    Mqtt(MqttAction),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteKind {
    Holding,
    Coil,
}

/// A write to a `[[modbus]]` device: holding register(s) typed as for reads, or a coil.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusAction {
    pub device: String,
    pub kind: WriteKind,
    pub address: u16,
    /// Holding registers: the type (default `u16`).
    #[serde(rename = "type", default)]
    pub data_type: Option<DataType>,
    #[serde(default)]
    pub order: Option<WordOrder>,
    /// The register holds (value - offset) / scale, as a read gives raw * scale + offset.
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub offset: Option<f64>,
}

/// A line for a `[[serial]]` port, from a template.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialAction {
    pub port: String,
    /// `{value}`, `{entry_id}`, `{created_at}`, `{channel}`, `{rule}`; TOML
    /// escapes (`\n`, `\r`) for the terminator.
    pub template: String,
    #[serde(default = "default_serial_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_serial_timeout_ms() -> u64 {
    1000
}

/// A publish to local subscribers (QoS 0), from a template.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttAction {
    pub topic: String,
    #[serde(default = "default_mqtt_template")]
    pub template: String,
}

fn default_mqtt_template() -> String {
    "{value}".into()
}

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 5] = ["value", "entry_id", "created_at", "channel", "rule"];

/// Checks a template's placeholders: `{name}` with a lowercase name must be
/// one of [`PLACEHOLDERS`]; other braces (JSON) are literal. The error names
/// the first unknown one.
pub fn check_template(template: &str) -> Result<(), String> {
    for name in placeholders(template) {
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{name}}} in {template:?} (expected one of {})",
                PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
            ));
        }
    }
    Ok(())
}

/// The `{name}` placeholders of a template, in order.
fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template.match_indices('{').filter_map(|(open, _)| {
        let after = &template[open + 1..];
        let close = after.find('}')?;
        let name = &after[..close];
        (!name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .then_some(name)
    })
}

impl DownlinkRule {
    /// Where the action goes: rules with the same target share its minimum interval.
    pub fn target_key(&self) -> String {
        match &self.action {
            Action::Modbus(m) => format!(
                "modbus {:?} {} {}",
                m.device,
                match m.kind {
                    WriteKind::Holding => "holding register",
                    WriteKind::Coil => "coil",
                },
                m.address
            ),
            Action::Serial(s) => format!("serial {:?}", s.port),
            Action::Mqtt(m) => format!("mqtt {:?}", m.topic),
        }
    }

    fn validate(
        &self,
        modbus: &[ModbusDeviceConfig],
        serial: &[SerialPortConfig],
    ) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if !matches!(self.source, Target::Field(_) | Target::Status) {
            return Err(format!(
                "source = {:?}: expected field1..field8 or status",
                self.source.to_string()
            ));
        }
        for (key, v) in [("min", self.min), ("max", self.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(format!("{key} must be a finite number"));
            }
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                return Err(format!("min ({min}) is above max ({max})"));
            }
        }
        if self.max_age_secs == 0 {
            return Err("max_age_secs must be at least 1".into());
        }
        match &self.action {
            Action::Modbus(m) => {
                if !modbus.iter().any(|d| d.name == m.device) {
                    return Err(format!(
                        "action.modbus.device = {:?}: no [[modbus]] device has that name",
                        m.device
                    ));
                }
                match m.kind {
                    WriteKind::Holding => {
                        if m.data_type == Some(DataType::Bool) {
                            return Err("action.modbus: type \"bool\" is written to a coil (kind = \"coil\"); a single bit of a holding register is not writable".into());
                        }
                        if m.scale == Some(0.0) || m.scale.is_some_and(|s| !s.is_finite()) {
                            return Err(
                                "action.modbus.scale must be a finite number other than 0".into()
                            );
                        }
                        if m.offset.is_some_and(|o| !o.is_finite()) {
                            return Err("action.modbus.offset must be a finite number".into());
                        }
                    }
                    WriteKind::Coil => {
                        if m.data_type.is_some_and(|t| t != DataType::Bool)
                            || m.order.is_some()
                            || m.scale.is_some()
                            || m.offset.is_some()
                        {
                            return Err("action.modbus: a coil takes no type, order, scale or offset (it is on or off)".into());
                        }
                    }
                }
            }
            Action::Serial(s) => {
                if !serial.iter().any(|p| p.name == s.port) {
                    return Err(format!(
                        "action.serial.port = {:?}: no [[serial]] port has that name",
                        s.port
                    ));
                }
                check_template(&s.template).map_err(|e| format!("action.serial.template: {e}"))?;
                if s.template.is_empty() {
                    return Err("action.serial.template must not be empty".into());
                }
                if s.timeout_ms == 0 {
                    return Err("action.serial.timeout_ms must be at least 1".into());
                }
            }
            Action::Mqtt(m) => {
                if m.topic.is_empty() || m.topic.contains(['+', '#']) {
                    return Err(format!(
                        "action.mqtt.topic = {:?}: a topic without wildcards is needed",
                        m.topic
                    ));
                }
                if m.topic.starts_with("channels/") {
                    return Err(format!(
                        "action.mqtt.topic = {:?}: ThingSpeak's namespace (channels/...) is not for local commands",
                        m.topic
                    ));
                }
                check_template(&m.template).map_err(|e| format!("action.mqtt.template: {e}"))?;
            }
        }
        Ok(())
    }
}

/// Checks every rule against the devices and ports they name; the error
/// names the rule.
/// Checks every rule; the error is the index of the rule at fault and what is wrong.
pub fn validate(
    rules: &[DownlinkRule],
    modbus: &[ModbusDeviceConfig],
    serial: &[SerialPortConfig],
) -> Result<(), (usize, String)> {
    let mut names = HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        rule.validate(modbus, serial).map_err(|e| {
            (
                i,
                format!("invalid [[downlink]] #{} ({:?}): {e}", i + 1, rule.name),
            )
        })?;
        if !names.insert(rule.name.as_str()) {
            return Err((
                i,
                format!(
                    "[[downlink]] #{}: the name {:?} is used twice (it keys the state kept on disk)",
                    i + 1,
                    rule.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> DownlinkRule {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn plc() -> Vec<ModbusDeviceConfig> {
        vec![toml::from_str(
            r#"
            name = "plc"
            unit_id = 1
            channel = 1
            transport.tcp.address = "127.0.0.1:502"
            points = []
            "#,
        )
        .unwrap()]
    }

    #[test]
    fn a_rule_parses_and_bad_ones_name_the_key() {
        let r = rule(
            r#"
            name = "setpoint"
            channel = 1001
            source = "field1"
            min = 5
            max = 30
            action.modbus = { device = "plc", kind = "holding", address = 10, type = "i16", scale = 0.1 }
            "#,
        );
        assert_eq!((r.min_interval_ms, r.max_age_secs), (1000, 300));
        validate(std::slice::from_ref(&r), &plc(), &[]).unwrap();
        assert_eq!(r.target_key(), "modbus \"plc\" holding register 10");

        let mut bad = r.clone();
        bad.action = Action::Modbus(ModbusAction {
            device: "nope".into(),
            ..match &r.action {
                Action::Modbus(m) => m.clone(),
                _ => unreachable!(),
            }
        });
        let (at, e) = validate(&[bad], &plc(), &[]).unwrap_err();
        assert_eq!(at, 0);
        assert!(
            e.contains("#1 (\"setpoint\")") && e.contains("no [[modbus]] device"),
            "{e}"
        );

        let mut swapped = r.clone();
        swapped.min = Some(40.0);
        assert!(validate(&[swapped], &plc(), &[])
            .unwrap_err()
            .1
            .contains("min (40) is above max (30)"));
        let (at, e) = validate(&[r.clone(), r.clone()], &plc(), &[]).unwrap_err();
        assert!(e.contains("used twice"), "{e}");
        assert_eq!(at, 1, "the second rule of the name is at fault");

        let mqtt = rule(
            r#"
            name = "relay"
            channel = 1001
            source = "status"
            action.mqtt = { topic = "home/relay/set", template = "{\"on\": {value}, \"id\": {entry_id}}" }
            "#,
        );
        validate(&[mqtt], &[], &[]).unwrap();
        let e = check_template("SET {valeu}\n").unwrap_err();
        assert!(e.contains("unknown placeholder {valeu}"), "{e}");
        let coil: Result<DownlinkRule, _> = toml::from_str(
            r#"
            name = "c"
            channel = 1
            source = "field2"
            action.modbus = { device = "plc", kind = "coil", address = 3, scale = 2 }
            "#,
        );
        let (_, e) = validate(&[coil.unwrap()], &plc(), &[]).unwrap_err();
        assert!(e.contains("a coil takes no type"), "{e}");
        let lat: Result<DownlinkRule, _> = toml::from_str(
            r#"
            name = "l"
            channel = 1
            source = "lat"
            action.mqtt = { topic = "x" }
            "#,
        );
        assert!(validate(&[lat.unwrap()], &[], &[])
            .unwrap_err()
            .1
            .contains("expected field1..field8 or status"));
    }
}
