//! `tsgw probe serial PATH`: prints the lines a serial device sends as they
//! arrive, each with what the parser makes of it: the port's parser from the
//! config (when a `[[serial]]` there uses PATH, or another name of the same
//! device: `/dev/serial/by-id/...` is `/dev/ttyUSB0`) or `--parser`. The
//! config is `--config`, else `TSGW_CONFIG`, else /etc/tsgw/gateway.toml
//! when that exists, as for the other commands.
//!
//! Opening, framing and parsing are the gateway's own (`tsgw_serial::once`,
//! `tsgw_core::extract`), so a line the probe parses is one the gateway takes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tsgw_core::extract::{Extractor, PayloadFormat};
use tsgw_serial::framing::Frame;
use tsgw_serial::once::LineReader;
use tsgw_serial::SerialPortConfig;

use crate::config::{GatewayConfig, DEFAULT_CONFIG};

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
    /// A config whose `[[serial]]` entry for PATH gives the settings and parser
    /// [default: /etc/tsgw/gateway.toml, if it exists].
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

/// The config's `[[serial]]` entry for PATH and the file it is in. A config
/// given (`--config`, `TSGW_CONFIG`) must load; the default one is read only
/// if it exists, and one that does not load is skipped with a warning: the
/// probe is for trying a device out before its config is right.
fn configured_port(
    probe: &SerialProbe,
    default: &Path,
) -> anyhow::Result<Option<(SerialPortConfig, PathBuf)>> {
    let (file, given) = match &probe.config {
        Some(file) => (file.clone(), true),
        None => (default.to_path_buf(), false),
    };
    if !file.exists() {
        anyhow::ensure!(!given, "config file {} does not exist", file.display());
        return Ok(None);
    }
    let config = match GatewayConfig::load(&file) {
        Ok(config) => config,
        Err(e) if !given => {
            eprintln!(
                "not using {} ({e:#}); give --parser, or --config with a valid file",
                file.display()
            );
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(same_port(config.serial, &probe.path).map(|port| (port, file)))
}

/// The entry for `path`: the same name, or the same device file once
/// symlinks are resolved (udev's `/dev/serial/by-id/...` names point at
/// `/dev/ttyUSB0` and the like).
fn same_port(ports: Vec<SerialPortConfig>, path: &Path) -> Option<SerialPortConfig> {
    let device = |p: &Path| std::fs::canonicalize(p).ok();
    let wanted = device(path);
    ports
        .into_iter()
        .find(|port| port.path == path || (wanted.is_some() && device(&port.path) == wanted))
}

/// The port's settings: the config's entry for the path, or defaults; the
/// command line overrides. Also the config entry's name and file, if used.
fn port_config(
    probe: &SerialProbe,
    default_config: &Path,
) -> anyhow::Result<(SerialPortConfig, bool, Option<String>)> {
    let configured = configured_port(probe, default_config)?;
    let from_config = configured
        .as_ref()
        .map(|(port, file)| format!("[[serial]] {:?} in {}", port.name, file.display()));
    let mut port = match configured.map(|(port, _)| port) {
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
    let has_parser = from_config.is_some() || probe.parser.is_some();
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
    Ok((port, has_parser, from_config))
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
    let (port, has_parser, from_config) = port_config(&probe, Path::new(DEFAULT_CONFIG))?;
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
    let settings = match (&extractor, &from_config, probe.parser.is_some()) {
        (None, _, _) => " (no parser: lines are shown raw; give --parser or --config)".to_owned(),
        (Some(_), Some(entry), false) => format!(" (settings and parser of {entry})"),
        (Some(_), Some(entry), true) => format!(" (settings of {entry}, parser from --parser)"),
        (Some(_), None, _) => String::new(),
    };
    eprintln!(
        "reading {} at {} baud{settings}; Ctrl-C stops",
        probe.path.display(),
        port.baud,
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

    fn probe(path: &Path, config: Option<PathBuf>) -> SerialProbe {
        SerialProbe {
            path: path.to_path_buf(),
            baud: None,
            parser: None,
            config,
            poll: None,
            lines: None,
            seconds: None,
        }
    }

    const CONFIG: &str = r#"
[upstream]
client_id = "c"
username = "u"
password = "p"
[queue]
dir = "/tmp/tsgw-never-opened"
[[serial]]
name = "arduino"
path = "PORT"
channel = 1002
baud = 19200
parser = { format = "key_value", fields = { t = "field2" } }
"#;

    #[test]
    fn a_symlink_to_the_configured_port_is_the_same_port() {
        let dir = tempfile::tempdir().unwrap();
        let tty = dir.path().join("ttyUSB0");
        std::fs::write(&tty, "").unwrap();
        let by_id = dir.path().join("usb-Arduino_Uno-if00");
        std::os::unix::fs::symlink(&tty, &by_id).unwrap();
        let file = dir.path().join("gateway.toml");
        let config = |port: &Path| {
            std::fs::write(&file, CONFIG.replace("PORT", &port.display().to_string())).unwrap();
        };
        // The config names the device, the probe its by-id link, and the other way round.
        for (configured, probed) in [(&tty, &by_id), (&by_id, &tty), (&tty, &tty)] {
            config(configured);
            let (port, has_parser, from) = port_config(
                &probe(probed, Some(file.clone())),
                Path::new("/nonexistent"),
            )
            .unwrap();
            assert_eq!(
                (port.name.as_str(), port.baud, has_parser),
                ("arduino", 19200, true)
            );
            assert_eq!(
                from.unwrap(),
                format!("[[serial]] \"arduino\" in {}", file.display())
            );
        }
        // Another device is not that port.
        let other = dir.path().join("ttyUSB1");
        std::fs::write(&other, "").unwrap();
        let (port, has_parser, from) = port_config(
            &probe(&other, Some(file.clone())),
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!((port.baud, has_parser, from), (9600, false, None));
    }

    #[test]
    fn the_default_config_is_used_when_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let tty = dir.path().join("ttyUSB0");
        std::fs::write(&tty, "").unwrap();
        let default = dir.path().join("gateway.toml");
        // None there: defaults.
        let (port, has_parser, _) = port_config(&probe(&tty, None), &default).unwrap();
        assert_eq!((port.baud, has_parser), (9600, false));
        std::fs::write(&default, CONFIG.replace("PORT", &tty.display().to_string())).unwrap();
        let (port, has_parser, from) = port_config(&probe(&tty, None), &default).unwrap();
        assert_eq!((port.baud, has_parser), (19200, true));
        assert!(from.unwrap().ends_with(&default.display().to_string()));
        // A default that does not load is skipped; a config given must load.
        std::fs::write(&default, "[upstream]\nbogus = 1\n").unwrap();
        let (port, has_parser, _) = port_config(&probe(&tty, None), &default).unwrap();
        assert_eq!((port.baud, has_parser), (9600, false));
        let err = port_config(
            &probe(&tty, Some(default.clone())),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");
        let missing = dir.path().join("missing.toml");
        let err = port_config(&probe(&tty, Some(missing.clone())), &default).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_bad_parser_is_named() {
        let err = parse_parser(r#"{ format = "yaml" }"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--parser"), "{err}");
    }
}
