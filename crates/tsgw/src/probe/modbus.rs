//! `tsgw probe modbus`: reads a block once and shows every decoding of it,
//! so the installer can pick the type and word order whose value looks
//! right, then prints the `[[modbus]]` lines to paste.
//!
//! Decoding is the gateway's own (`tsgw_modbus::decode`), so what the probe
//! shows is what the poller will produce.

use std::fmt::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tsgw_modbus::decode::{decode_registers, BlockData};
use tsgw_modbus::once::read_block;
use tsgw_modbus::{
    DataType, ModbusTransport, Parity, RegisterKind, RtuConfig, TcpConfig, WordOrder,
};

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("transport").required(true).args(["tcp", "rtu"]))]
pub struct ModbusProbe {
    /// A Modbus TCP device (or gateway): HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// A Modbus RTU device on this serial port.
    #[arg(long, value_name = "PATH")]
    pub rtu: Option<String>,
    /// RTU: baud rate.
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// RTU: parity.
    #[arg(long, value_enum, default_value_t = ParityArg::None)]
    pub parity: ParityArg,
    /// RTU: data bits (5 to 8).
    #[arg(long, default_value_t = 8)]
    pub data_bits: u8,
    /// RTU: stop bits (1 or 2).
    #[arg(long, default_value_t = 1)]
    pub stop_bits: u8,
    /// The unit (slave) id.
    #[arg(long, default_value_t = 1)]
    pub unit: u8,
    /// The first 0-based protocol address (register 40001 in a vendor's table is holding address 0).
    #[arg(long)]
    pub address: u16,
    /// Registers or coils to read.
    #[arg(long, default_value_t = 2)]
    pub count: u16,
    /// The table to read.
    #[arg(long, value_enum, default_value_t = KindArg::Holding)]
    pub kind: KindArg,
    /// Deadline of the connect and of the answer, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ParityArg {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    Holding,
    Input,
    Coil,
    Discrete,
}

impl From<KindArg> for RegisterKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Holding => RegisterKind::Holding,
            KindArg::Input => RegisterKind::Input,
            KindArg::Coil => RegisterKind::Coil,
            KindArg::Discrete => RegisterKind::Discrete,
        }
    }
}

const ORDERS: [WordOrder; 4] = [
    WordOrder::ABCD,
    WordOrder::CDAB,
    WordOrder::BADC,
    WordOrder::DCBA,
];

impl ModbusProbe {
    fn transport(&self) -> anyhow::Result<ModbusTransport> {
        Ok(match (&self.tcp, &self.rtu) {
            (Some(address), _) => ModbusTransport::Tcp(TcpConfig {
                address: address.clone(),
            }),
            (None, Some(path)) => ModbusTransport::Rtu(RtuConfig {
                path: path.clone(),
                baud: self.baud,
                parity: match self.parity {
                    ParityArg::None => Parity::None,
                    ParityArg::Even => Parity::Even,
                    ParityArg::Odd => Parity::Odd,
                },
                data_bits: self.data_bits,
                stop_bits: self.stop_bits,
                inter_frame_delay_ms: 0,
            }),
            (None, None) => anyhow::bail!("give --tcp HOST:PORT or --rtu PATH"),
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        let kind = RegisterKind::from(self.kind);
        let max = kind.max_per_request();
        anyhow::ensure!(
            (1..=max).contains(&self.count),
            "--count {} is outside 1..={max} (the most one {} read may ask for)",
            self.count,
            kind.describe()
        );
        anyhow::ensure!(
            u32::from(self.address) + u32::from(self.count) <= 65_536,
            "--address {} with --count {} runs past the last address 65535",
            self.address,
            self.count
        );
        anyhow::ensure!(self.timeout_ms > 0, "--timeout-ms must be above 0");
        Ok(())
    }
}

pub async fn run(probe: ModbusProbe) -> anyhow::Result<()> {
    probe.check()?;
    let transport = probe.transport()?;
    let kind = RegisterKind::from(probe.kind);
    let where_ = match &transport {
        ModbusTransport::Tcp(t) => format!("tcp {}", t.address),
        ModbusTransport::Rtu(r) => format!("rtu {} at {} baud", r.path, r.baud),
    };
    let timeout = Duration::from_millis(probe.timeout_ms);
    let data = read_block(
        &transport,
        probe.unit,
        kind,
        probe.address,
        probe.count,
        timeout,
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "reading {} {} {}..{} of unit {} ({where_}): {e}",
            probe.count,
            plural_kind(kind),
            probe.address,
            u32::from(probe.address) + u32::from(probe.count) - 1,
            probe.unit
        )
    })?;
    print!(
        "{}",
        report(&data, kind, probe.address, probe.unit, &transport, &where_)
    );
    Ok(())
}

fn plural_kind(kind: RegisterKind) -> String {
    format!("{}s", kind.describe())
}

/// Everything the probe prints for a successful read.
pub fn report(
    data: &BlockData,
    kind: RegisterKind,
    start: u16,
    unit: u8,
    transport: &ModbusTransport,
    where_: &str,
) -> String {
    let mut out = String::new();
    let mut points = Vec::new();
    match data {
        BlockData::Bits(bits) => {
            let _ = writeln!(
                out,
                "Read {} {} from address {start} of unit {unit} ({where_}):\n\naddress  value",
                bits.len(),
                plural_kind(kind)
            );
            for (i, bit) in bits.iter().enumerate() {
                let address = u32::from(start) + i as u32;
                let _ = writeln!(out, "{address:>7}  {}", u8::from(*bit));
            }
            points.push((point_line(kind, start, "bool", None), String::new()));
        }
        BlockData::Registers(words) => {
            registers(&mut out, words, kind, start, unit, where_, &mut points);
        }
    }
    let _ = writeln!(
        out,
        "\nTo poll it, paste into the config and keep the point whose value looks right\n(set channel, target and a name):\n"
    );
    let _ = writeln!(out, "[[modbus]]\nname = \"device-{unit}\"\nunit_id = {unit}\nchannel = 0                 # your ThingSpeak channel id");
    match transport {
        ModbusTransport::Tcp(t) => {
            let _ = writeln!(out, "transport.tcp.address = {:?}", t.address);
        }
        ModbusTransport::Rtu(r) => {
            let parity = match r.parity {
                Parity::None => "none",
                Parity::Even => "even",
                Parity::Odd => "odd",
            };
            let _ = writeln!(
                out,
                "transport.rtu = {{ path = {:?}, baud = {}, parity = \"{parity}\", data_bits = {}, stop_bits = {} }}",
                r.path, r.baud, r.data_bits, r.stop_bits
            );
        }
    }
    out.push_str("points = [\n");
    for (line, value) in points {
        if value.is_empty() {
            let _ = writeln!(out, "  {line},");
        } else {
            let _ = writeln!(out, "  {line},   # {value}");
        }
    }
    out.push_str("]\n");
    out
}

/// The register table, the 32- and 64-bit decodings, and the candidate point lines.
fn registers(
    out: &mut String,
    words: &[u16],
    kind: RegisterKind,
    start: u16,
    unit: u8,
    where_: &str,
    points: &mut Vec<(String, String)>,
) {
    let _ = writeln!(
        out,
        "Read {} {} from address {start} of unit {unit} ({where_}):\n\naddress  raw        u16     i16",
        words.len(),
        plural_kind(kind)
    );
    for (i, word) in words.iter().enumerate() {
        let address = u32::from(start) + i as u32;
        let _ = writeln!(
            out,
            "{address:>7}  0x{word:04X}  {:>6}  {:>6}",
            decode(&[*word], DataType::U16, WordOrder::ABCD),
            decode(&[*word], DataType::I16, WordOrder::ABCD),
        );
    }
    if let Some(first) = words.first() {
        let u = decode(&[*first], DataType::U16, WordOrder::ABCD);
        let i = decode(&[*first], DataType::I16, WordOrder::ABCD);
        points.push((point_line(kind, start, "u16", None), u.clone()));
        if i != u {
            points.push((point_line(kind, start, "i16", None), i));
        }
    }
    if words.len() >= 2 {
        let _ = writeln!(
            out,
            "\n32-bit values (two registers from each address; the order names where the bytes A B C D of the value sit):\naddress  order  {:>12}  {:>12}  {:>14}",
            "u32", "i32", "f32"
        );
        for i in 0..words.len() - 1 {
            let address = u32::from(start) + i as u32;
            let pair = &words[i..i + 2];
            for order in ORDERS {
                let f = decode(pair, DataType::F32, order);
                let _ = writeln!(
                    out,
                    "{address:>7}  {:<5}  {:>12}  {:>12}  {:>14}",
                    format!("{order:?}"),
                    decode(pair, DataType::U32, order),
                    decode(pair, DataType::I32, order),
                    f,
                );
                if i == 0 && plausible(pair, DataType::F32, order) {
                    points.push((point_line(kind, start, "f32", Some(order)), f));
                }
            }
        }
    }
    if words.len() >= 4 {
        let _ = writeln!(
            out,
            "\n64-bit floats (four registers from each address):\naddress  order  {:>22}",
            "f64"
        );
        for i in 0..words.len() - 3 {
            let address = u32::from(start) + i as u32;
            let quad = &words[i..i + 4];
            for order in ORDERS {
                let f = decode(quad, DataType::F64, order);
                let _ = writeln!(out, "{address:>7}  {:<5}  {f:>22}", format!("{order:?}"));
                if i == 0 && plausible(quad, DataType::F64, order) {
                    points.push((point_line(kind, start, "f64", Some(order)), f));
                }
            }
        }
    }
}

fn decode(words: &[u16], data_type: DataType, order: WordOrder) -> String {
    match decode_registers(words, data_type, order, None) {
        // An f32 in its own precision: what the meter meant, not the f64 widening.
        Some(v)
            if data_type == DataType::F32
                && v.is_finite()
                && (v == 0.0 || (1e-6..1e15).contains(&v.abs())) =>
        {
            (v as f32).to_string()
        }
        Some(v) if v.is_finite() && (v == 0.0 || (1e-6..1e15).contains(&v.abs())) => {
            tsgw_core::Value::Number(v).to_string()
        }
        Some(v) if v.is_finite() => format!("{v:.6e}"),
        Some(v) => format!("{v}"),
        None => "?".to_owned(),
    }
}

/// A float decoding worth suggesting: finite, and of a size a meter reports.
fn plausible(words: &[u16], data_type: DataType, order: WordOrder) -> bool {
    decode_registers(words, data_type, order, None)
        .is_some_and(|v| v.is_finite() && (v == 0.0 || (1e-3..=1e9).contains(&v.abs())))
}

fn point_line(
    kind: RegisterKind,
    address: u16,
    data_type: &str,
    order: Option<WordOrder>,
) -> String {
    let kind = match kind {
        RegisterKind::Holding => "holding",
        RegisterKind::Input => "input",
        RegisterKind::Coil => "coil",
        RegisterKind::Discrete => "discrete",
    };
    let order = order.map_or(String::new(), |o| format!(", order = \"{o:?}\""));
    format!("{{ kind = \"{kind}\", address = {address}, type = \"{data_type}\"{order}, target = \"field1\" }}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp() -> ModbusTransport {
        ModbusTransport::Tcp(TcpConfig {
            address: "10.0.0.5:502".into(),
        })
    }

    #[test]
    fn every_decoding_is_shown_and_the_plausible_floats_are_suggested() {
        // 123.456f32 = 0x42F6E979 sent low word first (CDAB), then -200 as i16.
        let data = BlockData::Registers(vec![0xE979, 0x42F6, 0xFF38]);
        let text = report(
            &data,
            RegisterKind::Holding,
            100,
            1,
            &tcp(),
            "tcp 10.0.0.5:502",
        );
        assert!(text.contains("    102  0xFF38   65336    -200"), "{text}");
        let cdab = text
            .lines()
            .find(|l| l.starts_with("    100  CDAB"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(cdab.ends_with(" 123.456"), "{cdab}");
        assert!(
            text.contains("{ kind = \"holding\", address = 100, type = \"f32\", order = \"CDAB\", target = \"field1\" },   # 123.456"),
            "{text}"
        );
        // ABCD of these words is about -1.8e25: shown, not suggested.
        assert!(!text.contains("order = \"ABCD\""), "{text}");
        assert!(text.contains("transport.tcp.address = \"10.0.0.5:502\""));
        // The pasted block parses as a device config once the channel is set.
        let block = text
            .split_once("[[modbus]]\n")
            .unwrap()
            .1
            .replace("channel = 0 ", "channel = 9 ");
        let device: tsgw_modbus::ModbusDeviceConfig =
            toml::from_str(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        device.validate().unwrap();
    }

    #[test]
    fn coils_show_bits() {
        let data = BlockData::Bits(vec![true, false]);
        let text = report(&data, RegisterKind::Coil, 7, 2, &tcp(), "tcp x");
        assert!(text.contains("      7  1\n      8  0"), "{text}");
        assert!(text.contains("type = \"bool\""));
    }
}
