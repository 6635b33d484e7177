//! `tsgw check-config --test`: polls every configured serial and Modbus
//! device once, prints the readings the gateway would queue, and fails
//! naming each device that did not answer (as `telegraf --test` does).
//!
//! Devices are tried one after another: units on one RTU bus share a port,
//! and a port can be opened by one reader at a time.

use std::fmt::Write;
use std::time::Duration;

use tsgw_core::Reading;

use crate::config::GatewayConfig;

/// What one device did.
#[derive(Debug)]
pub struct DeviceResult {
    /// `serial "arduino" (/dev/ttyUSB0)`.
    pub label: String,
    pub name: String,
    pub answered: bool,
    pub readings: Vec<Reading>,
    /// The line the readings came from (serial).
    pub line: Option<String>,
    pub problems: Vec<String>,
}

/// Polls every device of `config` once; `wait` bounds how long a serial
/// device that talks by itself gets to print a line.
pub async fn test_devices(config: &GatewayConfig, wait: Duration) -> Vec<DeviceResult> {
    let mut results = Vec::new();
    for port in &config.serial {
        let label = format!("serial {:?} ({})", port.name, port.path.display());
        let result = match tsgw_serial::once::read_once(port, wait).await {
            Ok(report) => DeviceResult {
                answered: !report.readings.is_empty(),
                readings: report.readings,
                line: report.line,
                problems: report.problems,
                label,
                name: port.name.clone(),
            },
            Err(e) => DeviceResult {
                answered: false,
                readings: Vec::new(),
                line: None,
                problems: vec![format!(
                    "{e} (a running gateway holds its ports: stop it first)"
                )],
                label,
                name: port.name.clone(),
            },
        };
        results.push(result);
    }
    for device in &config.modbus {
        let endpoint = match &device.transport {
            tsgw_modbus::ModbusTransport::Tcp(t) => t.address.clone(),
            tsgw_modbus::ModbusTransport::Rtu(r) => r.path.clone(),
        };
        let label = format!(
            "modbus {:?} (unit {} on {endpoint})",
            device.name, device.unit_id
        );
        let result = match tsgw_modbus::once::poll_once(device).await {
            Ok(report) => DeviceResult {
                answered: report.answered,
                readings: report.readings,
                line: None,
                problems: report.problems,
                label,
                name: device.name.clone(),
            },
            Err(e) => DeviceResult {
                answered: false,
                readings: Vec::new(),
                line: None,
                problems: vec![e.to_string()],
                label,
                name: device.name.clone(),
            },
        };
        results.push(result);
    }
    results
}

/// The results as the command prints them.
pub fn render(results: &[DeviceResult]) -> String {
    let mut out = String::new();
    if results.is_empty() {
        out.push_str("no [[serial]] or [[modbus]] devices to test (MQTT devices publish by themselves: see tsgw tail)\n");
    }
    for r in results {
        let verdict = if r.answered {
            "answered"
        } else {
            "DID NOT ANSWER"
        };
        let _ = write!(out, "{}: {verdict}", r.label);
        if let Some(line) = &r.line {
            let _ = write!(out, ", line {line:?}");
        }
        out.push('\n');
        for reading in &r.readings {
            let _ = writeln!(
                out,
                "  would queue: channel {} {} = {} (measured {})",
                reading.channel,
                reading.target,
                reading.value,
                reading
                    .measured_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
        }
        for problem in &r.problems {
            let _ = writeln!(out, "  problem: {problem}");
        }
    }
    out
}

/// `Err` naming every device that did not answer.
pub fn verdict(results: &[DeviceResult]) -> anyhow::Result<()> {
    let silent: Vec<&str> = results
        .iter()
        .filter(|r| !r.answered)
        .map(|r| r.name.as_str())
        .collect();
    match silent.len() {
        0 => Ok(()),
        1 => anyhow::bail!("device {:?} did not answer", silent[0]),
        n => anyhow::bail!(
            "{n} devices did not answer: {}",
            silent
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, answered: bool) -> DeviceResult {
        DeviceResult {
            label: format!("modbus {name:?}"),
            name: name.into(),
            answered,
            readings: Vec::new(),
            line: None,
            problems: if answered {
                Vec::new()
            } else {
                vec!["not answering: timeout (no answer within 300ms)".into()]
            },
        }
    }

    #[test]
    fn silent_devices_are_named_and_fail_the_command() {
        let all = [
            result("meter", true),
            result("plc", false),
            result("pump", false),
        ];
        let text = render(&all);
        assert!(
            text.contains("modbus \"plc\": DID NOT ANSWER\n  problem: not answering: timeout"),
            "{text}"
        );
        let err = verdict(&all).unwrap_err().to_string();
        assert_eq!(err, "2 devices did not answer: \"plc\", \"pump\"");
        assert!(verdict(&all[..1]).is_ok());
        assert_eq!(
            verdict(&all[..2]).unwrap_err().to_string(),
            "device \"plc\" did not answer"
        );
    }
}
