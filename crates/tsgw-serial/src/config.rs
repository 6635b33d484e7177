//! How one serial port is configured (`[[serial]]` in the gateway's TOML).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tsgw_core::extract::{Extractor, PayloadFormat};
use tsgw_core::ChannelId;

use crate::escape::unescape;
use crate::SerialError;

/// Longest accepted `max_line_bytes`: lines are buffered in memory per port.
const MAX_LINE_LIMIT: usize = 64 * 1024;
/// Longest accepted line terminator, in bytes.
const MAX_TERMINATOR: usize = 16;

/// One serial device. Deserializes from a `[[serial]]` table; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    /// Name used in logs, metrics (`device` label) and readings' origin.
    pub name: String,
    /// Device path. Prefer `/dev/serial/by-id/...`: it survives replugging into another USB port.
    pub path: PathBuf,
    /// Channel for destinations in `parser` that do not name their own.
    pub channel: ChannelId,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub data_bits: DataBits,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default)]
    pub stop_bits: StopBits,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Lock the port against other openers (TIOCEXCL plus flock), as tokio-serial does by default.
    #[serde(default = "default_true")]
    pub exclusive: bool,
    /// End of a line; escapes `\r \n \t \0 \\ \xNN` allowed. `\r` around lines is always stripped.
    #[serde(default = "default_terminator")]
    pub line_terminator: String,
    /// Longer lines are dropped and counted (`device_errors_total{kind="overlong"}`).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// How a line is turned into values, e.g. `{ format = "key_value", fields = { t = "field1" } }`.
    pub parser: PayloadFormat,
    /// Ask the device for each reading instead of waiting for it to talk.
    #[serde(default)]
    pub poll: Option<PollConfig>,
    /// First reconnect delay after the port closed or could not be opened.
    #[serde(default = "default_reconnect_initial_ms")]
    pub reconnect_initial_ms: u64,
    /// Cap of the doubling reconnect delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// Request/response polling: send `command` every `interval_ms`, expect a line within `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    /// Bytes to send; escapes `\r \n \t \0 \\ \xNN` allowed (use a single-quoted TOML string for `\xNN`).
    pub command: String,
    #[serde(default = "default_poll_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_poll_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum DataBits {
    Five,
    Six,
    Seven,
    #[default]
    Eight,
}

impl TryFrom<u8> for DataBits {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            5 => Ok(DataBits::Five),
            6 => Ok(DataBits::Six),
            7 => Ok(DataBits::Seven),
            8 => Ok(DataBits::Eight),
            other => Err(format!("data_bits {other} is not 5, 6, 7 or 8")),
        }
    }
}

impl From<DataBits> for u8 {
    fn from(d: DataBits) -> u8 {
        match d {
            DataBits::Five => 5,
            DataBits::Six => 6,
            DataBits::Seven => 7,
            DataBits::Eight => 8,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum StopBits {
    #[default]
    One,
    Two,
}

impl TryFrom<u8> for StopBits {
    type Error = String;
    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            1 => Ok(StopBits::One),
            2 => Ok(StopBits::Two),
            other => Err(format!("stop_bits {other} is not 1 or 2")),
        }
    }
}

impl From<StopBits> for u8 {
    fn from(s: StopBits) -> u8 {
        match s {
            StopBits::One => 1,
            StopBits::Two => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

fn default_baud() -> u32 {
    9600
}
fn default_true() -> bool {
    true
}
fn default_terminator() -> String {
    "\n".into()
}
fn default_max_line_bytes() -> usize {
    1024
}
fn default_reconnect_initial_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_poll_interval_ms() -> u64 {
    1000
}
fn default_poll_timeout_ms() -> u64 {
    500
}

/// A port's settings after validation: everything decoded and compiled.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub(crate) path: String,
    pub(crate) terminator: Vec<u8>,
    pub(crate) extractor: Extractor,
    pub(crate) poll: Option<ResolvedPoll>,
    pub(crate) reconnect_initial: Duration,
    pub(crate) reconnect_max: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct ResolvedPoll {
    pub(crate) command: Vec<u8>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

impl SerialPortConfig {
    /// Checks every setting and compiles the parser. Errors name the port and the key.
    pub fn validate(&self) -> Result<(), SerialError> {
        self.resolve().map(|_| ())
    }

    pub(crate) fn resolve(&self) -> Result<Resolved, SerialError> {
        let err = |key: &str, message: String| SerialError::config(&self.name, key, message);
        if self.name.trim().is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        let path = match self.path.to_str() {
            Some(p) if !p.is_empty() => p.to_owned(),
            Some(_) => return Err(err("path", "must not be empty".into())),
            None => return Err(err("path", "is not valid UTF-8".into())),
        };
        if self.baud == 0 {
            return Err(err("baud", "must be greater than 0".into()));
        }
        let terminator = unescape(&self.line_terminator).map_err(|m| err("line_terminator", m))?;
        if terminator.is_empty() || terminator.len() > MAX_TERMINATOR {
            return Err(err(
                "line_terminator",
                format!("must be 1 to {MAX_TERMINATOR} bytes"),
            ));
        }
        if !(1..=MAX_LINE_LIMIT).contains(&self.max_line_bytes) {
            return Err(err(
                "max_line_bytes",
                format!("must be from 1 to {MAX_LINE_LIMIT}"),
            ));
        }
        let extractor = Extractor::compile(&self.parser, self.channel)
            .map_err(|e| err("parser", e.to_string()))?;
        let poll = self
            .poll
            .as_ref()
            .map(|p| {
                let command = unescape(&p.command).map_err(|m| err("poll.command", m))?;
                if command.is_empty() {
                    return Err(err("poll.command", "must not be empty".into()));
                }
                if p.interval_ms < 10 {
                    return Err(err("poll.interval_ms", "must be at least 10".into()));
                }
                if p.timeout_ms == 0 || p.timeout_ms > p.interval_ms {
                    return Err(err(
                        "poll.timeout_ms",
                        format!(
                            "must be from 1 to poll.interval_ms ({}), so answers cannot overlap",
                            p.interval_ms
                        ),
                    ));
                }
                Ok(ResolvedPoll {
                    command,
                    interval: Duration::from_millis(p.interval_ms),
                    timeout: Duration::from_millis(p.timeout_ms),
                })
            })
            .transpose()?;
        if self.reconnect_initial_ms == 0 {
            return Err(err(
                "reconnect_initial_ms",
                "must be greater than 0 (a zero delay would spin)".into(),
            ));
        }
        if self.reconnect_max_ms < self.reconnect_initial_ms {
            return Err(err(
                "reconnect_max_ms",
                "must not be less than reconnect_initial_ms".into(),
            ));
        }
        Ok(Resolved {
            path,
            terminator,
            extractor,
            poll,
            reconnect_initial: Duration::from_millis(self.reconnect_initial_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
        })
    }
}

impl From<DataBits> for tokio_serial::DataBits {
    fn from(d: DataBits) -> Self {
        match d {
            DataBits::Five => tokio_serial::DataBits::Five,
            DataBits::Six => tokio_serial::DataBits::Six,
            DataBits::Seven => tokio_serial::DataBits::Seven,
            DataBits::Eight => tokio_serial::DataBits::Eight,
        }
    }
}

impl From<Parity> for tokio_serial::Parity {
    fn from(p: Parity) -> Self {
        match p {
            Parity::None => tokio_serial::Parity::None,
            Parity::Odd => tokio_serial::Parity::Odd,
            Parity::Even => tokio_serial::Parity::Even,
        }
    }
}

impl From<StopBits> for tokio_serial::StopBits {
    fn from(s: StopBits) -> Self {
        match s {
            StopBits::One => tokio_serial::StopBits::One,
            StopBits::Two => tokio_serial::StopBits::Two,
        }
    }
}

impl From<FlowControl> for tokio_serial::FlowControl {
    fn from(f: FlowControl) -> Self {
        match f {
            FlowControl::None => tokio_serial::FlowControl::None,
            FlowControl::Software => tokio_serial::FlowControl::Software,
            FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<SerialPortConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    const ARDUINO: &str = r#"
        name = "arduino"
        path = "/dev/serial/by-id/usb-Arduino_Uno-if00"
        channel = 123456
        parser = { format = "key_value", fields = { t = "field1", h = "field2" } }
    "#;

    #[test]
    fn defaults_match_the_documentation() {
        let c = parse(ARDUINO).unwrap();
        assert_eq!(c.baud, 9600);
        assert_eq!(c.data_bits, DataBits::Eight);
        assert_eq!(c.parity, Parity::None);
        assert_eq!(c.stop_bits, StopBits::One);
        assert_eq!(c.flow_control, FlowControl::None);
        assert!(c.exclusive);
        assert_eq!(c.line_terminator, "\n");
        assert_eq!(c.max_line_bytes, 1024);
        assert_eq!(c.poll, None);
        assert_eq!(c.reconnect_max_ms, 30_000);
        c.validate().unwrap();
    }

    #[test]
    fn every_setting_parses() {
        let c = parse(
            r#"
            name = "meter"
            path = "/dev/ttyUSB0"
            channel = 7
            baud = 115200
            data_bits = 7
            parity = "even"
            stop_bits = 2
            flow_control = "hardware"
            exclusive = false
            line_terminator = '\r'
            max_line_bytes = 256
            reconnect_initial_ms = 100
            reconnect_max_ms = 5000
            poll = { command = 'READ\r\n', interval_ms = 2000, timeout_ms = 300 }
            [parser]
            format = "csv"
            separator = ";"
            columns = { 0 = "field1", 2 = { target = "field2", scale = 0.1 } }
            "#,
        )
        .unwrap();
        let r = c.resolve().unwrap();
        assert_eq!(r.terminator, b"\r");
        let poll = r.poll.unwrap();
        assert_eq!(poll.command, b"READ\r\n");
        assert_eq!(poll.timeout, Duration::from_millis(300));
        assert_eq!(c.parity, Parity::Even);
        assert_eq!(c.data_bits, DataBits::Seven);
        // Round trip through Serialize keeps every value.
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse(&text).unwrap(), c);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(parse(&format!("{ARDUINO}\nbuad = 9600")).is_err());
        assert!(parse(&format!("{ARDUINO}\ndata_bits = 9")).is_err());
        assert!(parse(&format!("{ARDUINO}\nparity = \"mark\"")).is_err());
        assert!(parse(&format!(
            "{ARDUINO}\npoll = {{ command = \"x\", every = 3 }}"
        ))
        .is_err());
    }

    #[test]
    fn validation_errors_name_port_and_key() {
        let mut c = parse(ARDUINO).unwrap();
        c.parser = toml::from_str(
            r#"format = "regex"
               pattern = '(?P<t>\d+'
               fields = { t = "field1" }"#,
        )
        .unwrap();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("\"arduino\""), "{msg}");
        assert!(msg.contains("parser"), "{msg}");
        assert!(msg.contains(r"(?P<t>\d+"), "{msg}");

        let mut c = parse(ARDUINO).unwrap();
        c.poll = Some(PollConfig {
            command: r"READ\q".into(),
            interval_ms: 1000,
            timeout_ms: 100,
        });
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("poll.command") && msg.contains(r"\q"), "{msg}");

        let mut c = parse(ARDUINO).unwrap();
        c.poll = Some(PollConfig {
            command: "READ".into(),
            interval_ms: 1000,
            timeout_ms: 2000,
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("poll.timeout_ms"));

        let mut c = parse(ARDUINO).unwrap();
        c.line_terminator = String::new();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("line_terminator"));

        let mut c = parse(ARDUINO).unwrap();
        c.reconnect_initial_ms = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("reconnect_initial_ms"));
    }
}
