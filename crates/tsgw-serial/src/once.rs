//! A port opened by hand, for the installer's tools: [`LineReader`] gives the
//! lines a device prints (`tsgw probe serial`), [`read_once`] waits for one
//! usable line of a configured port and turns it into the readings the
//! gateway would queue (`tsgw check-config --test`). Same opening, framing
//! and parsing as the port task.

use std::collections::VecDeque;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialStream;
use tsgw_core::{Origin, Reading, SourceKind};

use crate::config::SerialPortConfig;
use crate::framing::{Frame, LineFramer};
use crate::port::open_port;
use crate::SerialError;

/// Lines from an open port.
pub struct LineReader {
    stream: SerialStream,
    framer: LineFramer,
    frames: VecDeque<Frame>,
    max_line: usize,
    poll: Option<Vec<u8>>,
}

impl LineReader {
    /// Validates `config` and opens its port with its settings.
    pub async fn open(config: &SerialPortConfig) -> Result<Self, SerialError> {
        let resolved = config.resolve()?;
        let stream = open_port(config, &resolved.path).await.map_err(|e| {
            SerialError::config(
                &config.name,
                "path",
                format!("cannot open {}: {e}", resolved.path),
            )
        })?;
        Ok(Self {
            stream,
            framer: LineFramer::new(resolved.terminator, config.max_line_bytes),
            frames: VecDeque::new(),
            max_line: config.max_line_bytes,
            poll: resolved.poll.map(|p| p.command),
        })
    }

    /// Writes bytes to the device (a poll command).
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next line, or an over-long one's notice; `None` when the port
    /// closed (an unplugged adapter reads as end-of-file).
    pub async fn next_frame(&mut self) -> std::io::Result<Option<Frame>> {
        let mut buf = [0u8; 512];
        loop {
            if let Some(frame) = self.frames.pop_front() {
                return Ok(Some(frame));
            }
            let n = match self.stream.read(&mut buf).await {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            let mut out = Vec::new();
            self.framer.push(buf.get(..n).unwrap_or_default(), &mut out);
            self.frames.extend(out);
        }
    }

    /// The configured poll command, unescaped, if the port has one.
    pub fn poll_command(&self) -> Option<&[u8]> {
        self.poll.as_deref()
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }
}

/// What one read of a configured port produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LineReport {
    /// The line the readings came from, if one was usable.
    pub line: Option<String>,
    /// The readings the gateway would have queued for it.
    pub readings: Vec<Reading>,
    /// Lines that could not be used, and why; or why nothing came.
    pub problems: Vec<String>,
}

/// Opens the port, sends the poll command if it has one, and waits for the
/// first line that yields values: at most the poll timeout for a polled
/// device, `wait` for one that talks by itself. Lines that yield nothing
/// (a partial first line, noise) are reported and skipped.
pub async fn read_once(
    config: &SerialPortConfig,
    wait: Duration,
) -> Result<LineReport, SerialError> {
    let resolved = config.resolve()?;
    let mut reader = LineReader::open(config).await?;
    let mut report = LineReport {
        line: None,
        readings: Vec::new(),
        problems: Vec::new(),
    };
    let deadline = match &resolved.poll {
        Some(poll) => {
            if let Err(e) = reader.send(&poll.command).await {
                report
                    .problems
                    .push(format!("cannot send the poll command: {e}"));
                return Ok(report);
            }
            poll.timeout
        }
        None => wait,
    };
    let deadline = tokio::time::Instant::now() + deadline;
    loop {
        let frame = match tokio::time::timeout_at(deadline, reader.next_frame()).await {
            Err(_) => {
                report.problems.push(format!(
                    "no usable line within {:?}{}",
                    deadline_len(&resolved.poll, wait),
                    if resolved.poll.is_some() {
                        " of the poll command"
                    } else {
                        ""
                    }
                ));
                return Ok(report);
            }
            Ok(Err(e)) => {
                report
                    .problems
                    .push(format!("reading the port failed: {e}"));
                return Ok(report);
            }
            Ok(Ok(None)) => {
                report
                    .problems
                    .push("the port closed (end of file)".to_owned());
                return Ok(report);
            }
            Ok(Ok(Some(frame))) => frame,
        };
        let line = match frame {
            Frame::Overlong => {
                report.problems.push(format!(
                    "a line longer than {} bytes was dropped (max_line_bytes; wrong baud rate or terminator?)",
                    reader.max_line()
                ));
                continue;
            }
            Frame::Line(line) => line,
        };
        let text = String::from_utf8_lossy(&line).into_owned();
        let extraction = resolved.extractor.extract(&line);
        for e in &extraction.errors {
            report.problems.push(format!("line {text:?}: {e}"));
        }
        if extraction.values.is_empty() {
            continue;
        }
        let now = Utc::now();
        report.readings = extraction
            .values
            .into_iter()
            .map(|v| Reading {
                channel: v.channel,
                target: v.target,
                value: v.value,
                measured_at: v.measured_at.unwrap_or(now),
                origin: Origin::new(SourceKind::Serial, config.name.clone()),
            })
            .collect();
        report.line = Some(text);
        return Ok(report);
    }
}

fn deadline_len(poll: &Option<crate::config::ResolvedPoll>, wait: Duration) -> Duration {
    poll.as_ref().map_or(wait, |p| p.timeout)
}
