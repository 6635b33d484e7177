//! What the user writes in the config for a Modbus device, and its validation.
//!
//! Addresses are the 0-based protocol addresses sent on the wire (register
//! "40001" in a vendor's table is holding register address 0).

use serde::{Deserialize, Serialize};
use tsgw_core::{ChannelId, Target};

use crate::error::ModbusError;

/// One polled Modbus device (one unit id behind one transport).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    /// Unique name: label of its metrics and origin of its readings.
    pub name: String,
    pub transport: ModbusTransport,
    /// Modbus unit (slave) id. RTU: 1..=247. TCP: whatever the server expects (often 1 or 255).
    pub unit_id: u8,
    /// Channel of every point that does not name its own.
    pub channel: ChannelId,
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Deadline of one request (or of a TCP connect).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra attempts after a request timed out or the connection broke.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Unused registers (or coils) a block read may span to merge two points into one request.
    #[serde(default)]
    pub max_gap: u16,
    pub points: Vec<PointConfig>,
}

fn default_poll_interval_ms() -> u64 {
    10_000
}
fn default_timeout_ms() -> u64 {
    1_000
}
fn default_retries() -> u32 {
    1
}

/// How the device is reached. In TOML: `transport.tcp.address = "10.0.0.5:502"` or a
/// `[devices.transport.rtu]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ModbusTransport {
    Tcp(TcpConfig),
    Rtu(RtuConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// `host:port`; the host may be a name, resolved at every connect.
    pub address: String,
}

/// A serial RS-485/RS-232 line. Devices with the same `path` share one bus and must
/// agree on every setting here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RtuConfig {
    pub path: String,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Quiet time kept on the bus before every request (slow or picky RS-485 devices).
    #[serde(default)]
    pub inter_frame_delay_ms: u64,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

/// One value read from the device and where it goes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PointConfig {
    /// Optional label, used in logs and error messages.
    #[serde(default)]
    pub name: Option<String>,
    pub kind: RegisterKind,
    /// 0-based protocol address of the (first) register or coil.
    pub address: u16,
    #[serde(rename = "type")]
    pub data_type: DataType,
    #[serde(default)]
    pub order: WordOrder,
    /// For `type = "bool"` on a holding/input register: the bit (0 = least significant).
    #[serde(default)]
    pub bit: Option<u8>,
    /// value = raw * scale + offset
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    pub target: Target,
    /// Overrides the device's channel.
    #[serde(default)]
    pub channel: Option<ChannelId>,
}

fn default_scale() -> f64 {
    1.0
}

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    Holding,
    Input,
    Coil,
    Discrete,
}

impl RegisterKind {
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }

    /// Most items one read request may ask for (Modbus spec limits).
    pub fn max_per_request(self) -> u16 {
        if self.is_bit() {
            2000
        } else {
            125
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            RegisterKind::Holding => "holding register",
            RegisterKind::Input => "input register",
            RegisterKind::Coil => "coil",
            RegisterKind::Discrete => "discrete input",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
}

impl DataType {
    /// Registers the type occupies (bools occupy one register or one coil).
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
        }
    }
}

/// Byte order of a multi-register value, named by where the bytes of the big-endian
/// value `A B C D` land on the wire. Two independent properties:
/// - word order: `ABCD`/`BADC` send the most significant register first, `CDAB`/`DCBA`
///   the least significant first;
/// - byte order in a register: `ABCD`/`CDAB` big-endian (as Modbus specifies),
///   `BADC`/`DCBA` swapped.
///
/// 64-bit values apply the same two properties to four registers: `CDAB` means
/// `GH EF CD AB` on the wire (all words reversed), `BADC` means `BA DC FE HG`. 16-bit
/// values only see the byte order (`BADC`/`DCBA` swap the register's two bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum WordOrder {
    #[default]
    #[serde(alias = "abcd")]
    ABCD,
    #[serde(alias = "cdab")]
    CDAB,
    #[serde(alias = "badc")]
    BADC,
    #[serde(alias = "dcba")]
    DCBA,
}

impl WordOrder {
    pub(crate) fn low_word_first(self) -> bool {
        matches!(self, WordOrder::CDAB | WordOrder::DCBA)
    }

    pub(crate) fn bytes_swapped(self) -> bool {
        matches!(self, WordOrder::BADC | WordOrder::DCBA)
    }
}

impl PointConfig {
    /// "point #2 \"voltage\" (input register 12)": how errors and logs name a point.
    pub fn describe(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!(
                "point #{index} {name:?} ({} {})",
                self.kind.describe(),
                self.address
            ),
            None => format!("point #{index} ({} {})", self.kind.describe(), self.address),
        }
    }

    /// Registers or coils the point occupies.
    pub fn width(&self) -> u16 {
        if self.kind.is_bit() {
            1
        } else {
            self.data_type.width()
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.kind.is_bit() {
            if self.data_type != DataType::Bool {
                return Err(format!(
                    "a {} holds one bit; use type = \"bool\", not {:?}",
                    self.kind.describe(),
                    self.data_type
                ));
            }
            if self.bit.is_some() {
                return Err(format!(
                    "`bit` only applies to registers, not to a {}",
                    self.kind.describe()
                ));
            }
        } else {
            match (self.data_type, self.bit) {
                (DataType::Bool, None) => {
                    return Err(
                        "type = \"bool\" on a register needs `bit` (0..=15) to pick the bit"
                            .to_owned(),
                    )
                }
                (DataType::Bool, Some(bit)) if bit > 15 => {
                    return Err(format!("bit {bit} is out of range 0..=15"))
                }
                (DataType::Bool, Some(_)) => {}
                (other, Some(_)) => {
                    return Err(format!(
                        "`bit` only applies to type = \"bool\", not {other:?}"
                    ))
                }
                (_, None) => {}
            }
        }
        let last = u32::from(self.address) + u32::from(self.width()) - 1;
        if last > u32::from(u16::MAX) {
            return Err(format!(
                "{:?} at address {} runs past the last address 65535",
                self.data_type, self.address
            ));
        }
        if !self.scale.is_finite() || !self.offset.is_finite() {
            return Err("scale and offset must be finite numbers".to_owned());
        }
        Ok(())
    }
}

/// One day.
pub const MAX_POLL_INTERVAL_MS: u64 = 86_400_000;
/// Ten minutes.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
pub const MAX_RETRIES: u64 = 100;
/// Ten seconds.
pub const MAX_INTER_FRAME_DELAY_MS: u64 = 10_000;

fn check_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} = {value} is outside {min}..={max}"))
    }
}

impl ModbusDeviceConfig {
    /// Checks everything that can be checked without touching the device.
    /// Errors name the device and, for a point, its index, name and register.
    pub fn validate(&self) -> Result<(), ModbusError> {
        let device_err = |message: String| ModbusError::Device {
            device: self.name.clone(),
            message,
        };
        if self.name.trim().is_empty() {
            return Err(device_err("`name` must not be empty".to_owned()));
        }
        match &self.transport {
            ModbusTransport::Tcp(tcp) => {
                let port_ok = tcp
                    .address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !port_ok {
                    return Err(device_err(format!(
                        "transport.tcp.address {:?} is not \"host:port\"",
                        tcp.address
                    )));
                }
            }
            ModbusTransport::Rtu(rtu) => {
                if rtu.path.trim().is_empty() {
                    return Err(device_err(
                        "transport.rtu.path must not be empty".to_owned(),
                    ));
                }
                if rtu.baud == 0 {
                    return Err(device_err("transport.rtu.baud must be positive".to_owned()));
                }
                if !(5..=8).contains(&rtu.data_bits) {
                    return Err(device_err(format!(
                        "transport.rtu.data_bits {} is not 5, 6, 7 or 8",
                        rtu.data_bits
                    )));
                }
                if !(1..=2).contains(&rtu.stop_bits) {
                    return Err(device_err(format!(
                        "transport.rtu.stop_bits {} is not 1 or 2",
                        rtu.stop_bits
                    )));
                }
                // 0 is broadcast (no answers) and 248..=255 are reserved on a serial line.
                if !(1..=247).contains(&self.unit_id) {
                    return Err(device_err(format!(
                        "unit_id {} is not a serial unit id (1..=247)",
                        self.unit_id
                    )));
                }
            }
        }
        // Upper bounds keep every deadline computable (no Instant overflow at runtime).
        check_range(
            "poll_interval_ms",
            self.poll_interval_ms,
            1,
            MAX_POLL_INTERVAL_MS,
        )
        .map_err(device_err)?;
        check_range("timeout_ms", self.timeout_ms, 1, MAX_TIMEOUT_MS).map_err(device_err)?;
        check_range("retries", u64::from(self.retries), 0, MAX_RETRIES).map_err(device_err)?;
        if let ModbusTransport::Rtu(rtu) = &self.transport {
            check_range(
                "transport.rtu.inter_frame_delay_ms",
                rtu.inter_frame_delay_ms,
                0,
                MAX_INTER_FRAME_DELAY_MS,
            )
            .map_err(device_err)?;
        }
        if self.points.is_empty() {
            return Err(device_err("has no points to poll".to_owned()));
        }
        for (index, point) in self.points.iter().enumerate() {
            point.validate().map_err(|message| ModbusError::Point {
                device: self.name.clone(),
                point: point.describe(index),
                message,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        name = "meter-1"
        unit_id = 3
        channel = 1234
        poll_interval_ms = 5000
        timeout_ms = 300
        retries = 2
        max_gap = 4
        transport.rtu = { path = "/dev/ttyUSB0", baud = 19200, parity = "even", inter_frame_delay_ms = 5 }

        [[points]]
        name = "voltage"
        kind = "input"
        address = 0
        type = "f32"
        order = "CDAB"
        target = "field1"

        [[points]]
        kind = "holding"
        address = 10
        type = "bool"
        bit = 3
        target = "field2"
        channel = 99
    "#;

    fn example() -> ModbusDeviceConfig {
        toml::from_str(EXAMPLE).unwrap()
    }

    #[test]
    fn parses_the_documented_shape_with_defaults() {
        let d = example();
        assert_eq!(
            d.transport,
            ModbusTransport::Rtu(RtuConfig {
                path: "/dev/ttyUSB0".into(),
                baud: 19200,
                parity: Parity::Even,
                data_bits: 8,
                stop_bits: 1,
                inter_frame_delay_ms: 5,
            })
        );
        assert_eq!(d.points[0].order, WordOrder::CDAB);
        assert_eq!(d.points[0].scale, 1.0);
        assert_eq!(d.points[1].bit, Some(3));
        assert_eq!(d.points[1].channel, Some(ChannelId::new(99).unwrap()));
        d.validate().unwrap();
    }

    #[test]
    fn tcp_transport_parses_from_a_dotted_key() {
        let d: ModbusDeviceConfig = toml::from_str(
            r#"
            name = "plc"
            unit_id = 1
            channel = 5
            transport.tcp.address = "plc.local:502"
            points = [{ kind = "coil", address = 7, type = "bool", target = "status" }]
            "#,
        )
        .unwrap();
        assert_eq!(
            d.transport,
            ModbusTransport::Tcp(TcpConfig {
                address: "plc.local:502".into()
            })
        );
        assert_eq!(
            (d.poll_interval_ms, d.timeout_ms, d.retries, d.max_gap),
            (10_000, 1_000, 1, 0)
        );
        d.validate().unwrap();
    }

    #[test]
    fn serialised_config_reads_back_identically() {
        let d = example();
        let text = toml::to_string(&d).unwrap();
        assert_eq!(
            toml::from_str::<ModbusDeviceConfig>(&text).unwrap(),
            d,
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<ModbusDeviceConfig>(&EXAMPLE.replace("max_gap", "maxgap"))
            .unwrap_err();
        assert!(err.to_string().contains("maxgap"), "{err}");
    }

    fn point_error(edit: impl FnOnce(&mut PointConfig)) -> String {
        let mut d = example();
        edit(&mut d.points[0]);
        d.validate().unwrap_err().to_string()
    }

    #[test]
    fn point_errors_name_device_point_and_register() {
        let msg = point_error(|p| p.kind = RegisterKind::Coil);
        assert!(msg.contains("meter-1"), "{msg}");
        assert!(msg.contains("\"voltage\" (coil 0)"), "{msg}");
        assert!(msg.contains("bool"), "{msg}");

        let msg = point_error(|p| p.address = 65535);
        assert!(msg.contains("input register 65535"), "{msg}");
        assert!(msg.contains("runs past"), "{msg}");

        let msg = point_error(|p| p.bit = Some(1));
        assert!(msg.contains("`bit` only applies"), "{msg}");

        let msg = point_error(|p| {
            p.data_type = DataType::Bool;
            p.bit = Some(16)
        });
        assert!(msg.contains("bit 16"), "{msg}");

        let msg = point_error(|p| p.data_type = DataType::Bool);
        assert!(msg.contains("needs `bit`"), "{msg}");

        let msg = point_error(|p| p.scale = f64::NAN);
        assert!(msg.contains("finite"), "{msg}");
    }

    #[test]
    fn device_errors_name_the_device_and_key() {
        let mut d = example();
        d.unit_id = 0;
        assert!(d.validate().unwrap_err().to_string().contains("unit_id 0"));

        let mut d = example();
        d.transport = ModbusTransport::Tcp(TcpConfig {
            address: "no-port".into(),
        });
        let msg = d.validate().unwrap_err().to_string();
        assert!(msg.contains("meter-1") && msg.contains("no-port"), "{msg}");

        let mut d = example();
        d.points.clear();
        assert!(d.validate().unwrap_err().to_string().contains("no points"));

        let mut d = example();
        d.timeout_ms = 0;
        assert!(d
            .validate()
            .unwrap_err()
            .to_string()
            .contains("timeout_ms = 0"));

        // Values that would overflow deadlines are config errors, not panics later.
        let mut d = example();
        d.poll_interval_ms = u64::MAX;
        assert!(d
            .validate()
            .unwrap_err()
            .to_string()
            .contains("poll_interval_ms"));
        let mut d = example();
        d.retries = u32::MAX;
        assert!(d.validate().unwrap_err().to_string().contains("retries"));
        let mut d = example();
        if let ModbusTransport::Rtu(rtu) = &mut d.transport {
            rtu.inter_frame_delay_ms = u64::MAX;
        }
        assert!(d
            .validate()
            .unwrap_err()
            .to_string()
            .contains("inter_frame_delay_ms"));
    }
}
