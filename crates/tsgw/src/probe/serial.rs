//! `tsgw probe serial PATH`: prints the lines a serial device sends as they
//! arrive, each with what the parser makes of it: the port's parser from the
//! config (when a `[[serial]]` there uses PATH) or `--parser`.
//!
//! Opening, framing and parsing are the gateway's own (`tsgw_serial::once`,
//! `tsgw_core::extract`), so a line the probe parses is one the gateway takes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tsgw_core::extract::{Extractor, PayloadFormat};
use tsgw_serial::framing::Frame;
use tsgw_serial::once::LineReader;
use tsgw_serial::SerialPortConfig;

use crate::config::GatewayConfig;

#[derive(Debug, Args)]
pub struct SerialProbe {
    /// The serial port (prefer /dev/serial/by-id/...).
    pub path: PathBuf,
    /// Baud rate (default: the configured port's, else 9600).
    #[arg(long)]
    pub baud: Option<u32>,
    /// How lines are parsed, as in the config: '{ format = "key_value", fields = { t = "field1" } }'.
    /// Default: the configured port's parser; without one, lines are shown raw.
    #[arg(long, value_name = "TOML")]
    pub parser: Option<String>,
    /// A config whose `[[serial]]` entry for PATH gives the settings and parser.
    #[arg(long, short, env = "TSGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Send this (escapes as in poll.command, e.g. 'READ\r\n') every second,
    /// for devices that answer only when asked.
    #[arg(long)]
    pub poll: Option<String>,
    /// Stop after this many lines (default: until Ctrl-C).
    #[arg(long)]
    pub lines: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub seconds: Option<u64>,
}

/// The port's settings: the config's entry for the path, or defaults; the
/// command line overrides.
fn port_config(probe: &SerialProbe) -> anyhow::Result<(SerialPortConfig, bool)> {
    let configured = match &probe.config {
        Some(path) if path.exists() => GatewayConfig::load(path)?
            .serial
            .into_iter()
            .find(|p| p.path == probe.path),
        Some(path) => anyhow::bail!("config file {} does not exist", path.display()),
        None => None,
    };
    let from_config = configured.is_some();
    let mut port = match configured {
        Some(port) => port,
        None => toml::from_str::<SerialPortConfig>(&format!(
            "name = \"probe\"\npath = {:?}\nchannel = 1\nparser = {{ format = \"plain\", target = \"status\" }}\n",
            probe.path.display().to_string()
        ))
        .context("building the probe's port settings")?,
    };
    // The probe only reads; it must not lock out a second look.
    port.exclusive = false;
    if let Some(baud) = probe.baud {
        port.baud = baud;
    }
    let has_parser = from_config || probe.parser.is_some();
    if let Some(text) = &probe.parser {
        port.parser = parse_parser(text)?;
    }
    if let Some(command) = &probe.poll {
        port.poll = Some(tsgw_serial::PollConfig {
            command: command.clone(),
            interval_ms: 1000,
            timeout_ms: 900,
        });
    }
    port.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((port, has_parser))
}

/// `--parser` as the inline table a config would hold.
fn parse_parser(text: &str) -> anyhow::Result<PayloadFormat> {
    #[derive(serde::Deserialize)]
    struct Wrapper {
        parser: PayloadFormat,
    }
    toml::from_str::<Wrapper>(&format!("parser = {text}"))
        .map(|w| w.parser)
        .map_err(|e| anyhow::anyhow!("--parser is not a parser table ({e})"))
}

pub async fn run(probe: SerialProbe) -> anyhow::Result<()> {
    let (port, has_parser) = port_config(&probe)?;
    let extractor = if has_parser {
        Some(
            Extractor::compile(&port.parser, port.channel)
                .map_err(|e| anyhow::anyhow!("--parser: {e}"))?,
        )
    } else {
        None
    };
    let mut reader = LineReader::open(&port).await.map_err(|e| {
        anyhow::anyhow!("{e} (a gateway using this port holds it: stop it while probing)")
    })?;
    eprintln!(
        "reading {} at {} baud{}; Ctrl-C stops",
        probe.path.display(),
        port.baud,
        match &extractor {
            Some(_) => "",
            None => " (no parser: lines are shown raw; give --parser or --config)",
        }
    );
    let command = reader.poll_command().map(<[u8]>::to_vec);
    let deadline = probe
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut seen = 0u64;
    loop {
        if probe.lines.is_some_and(|n| seen >= n) {
            return Ok(());
        }
        let frame = tokio::select! {
            frame = reader.next_frame() => frame.context("reading the port failed")?,
            _ = ticker.tick(), if command.is_some() => {
                if let Some(command) = &command {
                    reader.send(command).await.context("writing the poll command failed")?;
                }
                continue;
            }
            () = sleep_until(deadline) => return Ok(()),
        };
        let Some(frame) = frame else {
            anyhow::bail!("the port closed (end of file): unplugged?");
        };
        seen += 1;
        println!(
            "{}",
            describe(&frame, extractor.as_ref(), reader.max_line())
        );
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One line and what the parser makes of it.
pub fn describe(frame: &Frame, extractor: Option<&Extractor>, max_line: usize) -> String {
    let line = match frame {
        Frame::Overlong => {
            return format!(
                "(a line over {max_line} bytes, dropped: wrong baud rate or line_terminator?)"
            )
        }
        Frame::Line(line) => line,
    };
    let shown = format!("{:?}", String::from_utf8_lossy(line));
    let Some(extractor) = extractor else {
        return shown;
    };
    let extraction = extractor.extract(line);
    let mut parts: Vec<String> = extraction
        .values
        .iter()
        .map(|v| format!("{} {} = {}", v.channel, v.target, v.value))
        .collect();
    parts.extend(
        extraction
            .errors
            .iter()
            .map(|e| format!("! {}: {e}", e.reason())),
    );
    format!("{shown}  →  {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsgw_core::ChannelId;

    #[test]
    fn lines_are_shown_with_their_values_and_problems() {
        let parser =
            parse_parser(r#"{ format = "key_value", fields = { t = "field1", h = "field2" } }"#)
                .unwrap();
        let extractor = Extractor::compile(&parser, ChannelId::new(7).unwrap()).unwrap();
        let text = describe(&Frame::Line(b"t=21.5,h=40".to_vec()), Some(&extractor), 64);
        assert_eq!(text, "\"t=21.5,h=40\"  →  7 field1 = 21.5, 7 field2 = 40");
        let text = describe(&Frame::Line(b"t=21.5,oops".to_vec()), Some(&extractor), 64);
        assert!(
            text.contains("7 field1 = 21.5") && text.contains("! bad_pair"),
            "{text}"
        );
        assert_eq!(describe(&Frame::Line(b"raw".to_vec()), None, 64), "\"raw\"");
        assert!(describe(&Frame::Overlong, None, 64).contains("over 64 bytes"));
    }

    #[test]
    fn a_bad_parser_is_named() {
        let err = parse_parser(r#"{ format = "yaml" }"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--parser"), "{err}");
    }
}
