//! The life of one serial port: open, read lines (and poll), and on any loss
//! close, back off and reopen, until shutdown.

use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{interval, sleep, sleep_until, timeout, Interval, MissedTickBehavior};
use tokio_serial::SerialStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tsgw_core::{Metrics, Origin, Reading, SourceKind};

use crate::backoff::Backoff;
use crate::command::{Command, CommandError};
use crate::config::{Resolved, ResolvedPoll, SerialPortConfig};
use crate::framing::{Frame, LineFramer};

const SOURCE: &str = "serial";
/// Bytes read per syscall; lines longer than this simply take several reads.
const READ_CHUNK: usize = 512;
/// Device-caused warnings (bad lines, timeouts) are logged at most this often per port;
/// the rest go to debug so a chattering device cannot flood the journal. Metrics count all.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// A session that delivered lines for at least this long proves the device
/// healthy and resets the reconnect backoff. Requiring time as well as data
/// keeps a flapping adapter (one line, then end-of-file) on the slow path.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);

/// Why a session with an open port ended.
enum End {
    /// Shutdown was requested or the readings channel closed: stop the task.
    Stop,
    /// The port went away; `healthy` (see [`HEALTHY_AFTER`]) resets the backoff.
    Lost { healthy: bool },
}

/// Everything one port's task needs, owned by the task.
pub(crate) struct PortTask {
    name: String,
    config: SerialPortConfig,
    resolved: Resolved,
    readings: mpsc::Sender<Reading>,
    shutdown: CancellationToken,
    counters: PortMetrics,
    warn_limiter: WarnLimiter,
    /// Commands to write (downlink); waiting ones past their deadline are dropped.
    commands: Option<mpsc::Receiver<Command>>,
}

/// The port's metric handles, labelled once.
struct PortMetrics {
    metrics: Metrics,
    name: String,
    up: IntGauge,
    accepted: IntCounter,
}

impl PortMetrics {
    fn new(metrics: Metrics, name: &str) -> Self {
        Self {
            up: metrics.device_up.with_label_values(&[SOURCE, name]),
            accepted: metrics
                .readings_total
                .with_label_values(&[SOURCE, name, "accepted"]),
            name: name.to_owned(),
            metrics,
        }
    }

    fn device_error(&self, kind: &str) {
        self.metrics
            .device_errors_total
            .with_label_values(&[SOURCE, &self.name, kind])
            .inc();
    }

    fn parse_error(&self, reason: &str) {
        self.metrics
            .parse_errors_total
            .with_label_values(&[SOURCE, &self.name, reason])
            .inc();
    }
}

struct WarnLimiter {
    last: Option<Instant>,
}

impl WarnLimiter {
    /// True if a warning may be logged now.
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < WARN_EVERY => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

impl PortTask {
    pub(crate) fn new(
        config: SerialPortConfig,
        resolved: Resolved,
        readings: mpsc::Sender<Reading>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let counters = PortMetrics::new(metrics, &config.name);
        counters.up.set(0);
        Self {
            name: config.name.clone(),
            config,
            resolved,
            readings,
            shutdown,
            counters,
            warn_limiter: WarnLimiter { last: None },
            commands: None,
        }
    }

    pub(crate) fn with_commands(mut self, commands: mpsc::Receiver<Command>) -> Self {
        self.commands = Some(commands);
        self
    }

    pub(crate) async fn run(mut self) {
        let mut backoff =
            Backoff::new(self.resolved.reconnect_initial, self.resolved.reconnect_max);
        let mut framer =
            LineFramer::new(self.resolved.terminator.clone(), self.config.max_line_bytes);
        // Only a change of open error is worth a warning; a device that stays
        // unplugged all night would otherwise log every 30 s.
        let mut last_open_error: Option<String> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                opened = self.open() => opened,
            };
            let end = match opened {
                Ok(stream) => {
                    info!(port = %self.name, path = %self.resolved.path, "serial port opened");
                    last_open_error = None;
                    // A polled device counts as up once it answers; a talking one once its port is open.
                    if self.resolved.poll.is_none() {
                        self.counters.up.set(1);
                    }
                    framer.clear();
                    let end = self.session(stream, &mut framer).await;
                    self.counters.up.set(0);
                    end
                }
                Err(e) => {
                    self.counters.device_error("open");
                    let message = e.to_string();
                    if last_open_error.as_deref() != Some(message.as_str()) {
                        warn!(port = %self.name, path = %self.resolved.path, error = %message,
                            "cannot open serial port; retrying with backoff");
                        last_open_error = Some(message);
                    } else {
                        debug!(port = %self.name, error = %message, "serial port still unavailable");
                    }
                    End::Lost { healthy: false }
                }
            };
            match end {
                End::Stop => return,
                End::Lost { healthy } => {
                    if healthy {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    debug!(port = %self.name, ?delay, "reopening serial port after delay");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn open(&self) -> Result<SerialStream, tokio_serial::Error> {
        open_port(&self.config, &self.resolved.path).await
    }

    /// Reads (and polls) until the port is lost or the task must stop.
    async fn session(&mut self, mut stream: SerialStream, framer: &mut LineFramer) -> End {
        let mut buf = [0u8; READ_CHUNK];
        let mut frames = Vec::new();
        let opened_at = Instant::now();
        let mut got_line = false;
        let healthy = |got_line: bool| got_line && opened_at.elapsed() >= HEALTHY_AFTER;
        let poll = self.resolved.poll.clone();
        let mut ticker = poll.as_ref().map(|p| {
            let mut t = interval(p.interval);
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
            t
        });
        // When the outstanding poll request times out, if there is one.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return End::Stop,
                read = stream.read(&mut buf) => match read {
                    Ok(0) => {
                        // An unplugged USB adapter reads as end-of-file: treat it as a disconnect.
                        self.counters.device_error("disconnect");
                        warn!(port = %self.name, "serial port closed (end of file); will reopen");
                        return End::Lost { healthy: healthy(got_line) };
                    }
                    Ok(n) => {
                        framer.push(buf.get(..n).unwrap_or_default(), &mut frames);
                        for frame in frames.drain(..) {
                            match frame {
                                Frame::Overlong => {
                                    self.counters.device_error("overlong");
                                    let max = self.config.max_line_bytes;
                                    self.device_warning(format_args!(
                                        "line longer than {max} bytes dropped"));
                                }
                                Frame::Line(line) => {
                                    got_line = true;
                                    if poll.is_some() {
                                        // The device answers: any line settles the outstanding poll.
                                        deadline = None;
                                        self.counters.up.set(1);
                                    }
                                    if self.handle_line(&line).await.is_err() {
                                        return End::Stop;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted
                        || e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        self.counters.device_error("io");
                        warn!(port = %self.name, error = %e, "serial read failed; will reopen");
                        return End::Lost { healthy: healthy(got_line) };
                    }
                },
                _ = tick(&mut ticker) => {
                    let Some(p) = poll.as_ref() else { continue };
                    if deadline.take().is_some() {
                        self.poll_timed_out(p);
                    }
                    match self.send_command(&mut stream, p).await {
                        Ok(()) => deadline = Some(tokio::time::Instant::now() + p.timeout),
                        Err(()) => return End::Lost { healthy: healthy(got_line) },
                    }
                }
                Some(command) = next_command(&mut self.commands) => {
                    if self.write_command(&mut stream, command).await.is_err() {
                        return End::Lost { healthy: healthy(got_line) };
                    }
                }
                _ = wait_until(deadline), if deadline.is_some() => {
                    deadline = None;
                    if let Some(p) = poll.as_ref() {
                        self.poll_timed_out(p);
                    }
                }
            }
        }
    }

    /// Writes a downlink command; `Err` means the port is gone.
    async fn write_command(
        &mut self,
        stream: &mut SerialStream,
        command: Command,
    ) -> Result<(), ()> {
        let now = tokio::time::Instant::now();
        if now >= command.deadline {
            let _ = command
                .reply
                .send(Err(CommandError::NotOpen(command.within)));
            return Ok(());
        }
        let write = async {
            stream.write_all(&command.bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout_at(command.deadline, write).await {
            Ok(Ok(())) => {
                debug!(port = %self.name, bytes = command.bytes.len(), "command written");
                let _ = command.reply.send(Ok(()));
                Ok(())
            }
            Ok(Err(e)) => {
                self.counters.device_error("io");
                warn!(port = %self.name, error = %e, "serial write of a command failed; will reopen");
                let _ = command.reply.send(Err(CommandError::Write(e.to_string())));
                Err(())
            }
            Err(_) => {
                self.counters.device_error("timeout");
                warn!(port = %self.name, "serial write of a command stalled; will reopen");
                let _ = command
                    .reply
                    .send(Err(CommandError::Write("write stalled".into())));
                Err(())
            }
        }
    }

    fn poll_timed_out(&mut self, p: &ResolvedPoll) {
        self.counters.device_error("timeout");
        self.counters.up.set(0);
        self.device_warning(format_args!("no answer to poll within {:?}", p.timeout));
    }

    /// Writes the poll command. A write that cannot finish (e.g. hardware flow
    /// control holding CTS low) is a timeout; a failed write means the port is gone.
    async fn send_command(
        &mut self,
        stream: &mut SerialStream,
        p: &ResolvedPoll,
    ) -> Result<(), ()> {
        let write = async {
            stream.write_all(&p.command).await?;
            stream.flush().await
        };
        match timeout(p.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.counters.device_error("io");
                warn!(port = %self.name, error = %e, "serial write failed; will reopen");
                Err(())
            }
            Err(_) => {
                self.counters.device_error("timeout");
                warn!(port = %self.name, "serial write of poll command stalled; will reopen");
                Err(())
            }
        }
    }

    /// Turns one line into readings. `Err` means stop: the readings channel is
    /// closed (the gateway is shutting down) or shutdown was requested.
    async fn handle_line(&mut self, line: &[u8]) -> Result<(), ()> {
        let extraction = self.resolved.extractor.extract(line);
        for e in &extraction.errors {
            self.counters.parse_error(e.reason());
        }
        if let Some(first) = extraction.errors.first() {
            let shown = String::from_utf8_lossy(line.get(..80).unwrap_or(line)).into_owned();
            self.device_warning(format_args!(
                "line {shown:?} partly or wholly unusable: {first} ({} problem(s), {} value(s) kept)",
                extraction.errors.len(),
                extraction.values.len()
            ));
        }
        let now = Utc::now();
        for value in extraction.values {
            let reading = Reading {
                channel: value.channel,
                target: value.target,
                value: value.value,
                measured_at: value.measured_at.unwrap_or(now),
                origin: Origin::new(SourceKind::Serial, self.name.clone()),
            };
            self.send(reading).await?;
        }
        Ok(())
    }

    async fn send(&mut self, reading: Reading) -> Result<(), ()> {
        tokio::select! {
            sent = self.readings.send(reading) => match sent {
                Ok(()) => {
                    self.counters.accepted.inc();
                    Ok(())
                }
                Err(_) => {
                    debug!(port = %self.name, "readings channel closed; serial port task stops");
                    Err(())
                }
            },
            _ = self.shutdown.cancelled() => Err(()),
        }
    }

    fn device_warning(&mut self, message: std::fmt::Arguments<'_>) {
        if self.warn_limiter.allow() {
            warn!(port = %self.name, "{message} (further device warnings for a minute at debug level)");
        } else {
            debug!(port = %self.name, "{message}");
        }
    }
}

/// Opens `path` with the port's line settings, on the blocking pool:
/// `open(2)` on a tty can stall on some drivers.
pub(crate) async fn open_port(
    c: &SerialPortConfig,
    path: &str,
) -> Result<SerialStream, tokio_serial::Error> {
    let builder = tokio_serial::new(path.to_owned(), c.baud)
        .data_bits(c.data_bits.into())
        .parity(c.parity.into())
        .stop_bits(c.stop_bits.into())
        .flow_control(c.flow_control.into())
        .exclusive(c.exclusive);
    match tokio::task::spawn_blocking(move || SerialStream::open(&builder)).await {
        Ok(result) => result,
        Err(join) => Err(tokio_serial::Error::new(
            tokio_serial::ErrorKind::Unknown,
            format!("opening task failed: {join}"),
        )),
    }
}

/// The next command, if any; never resolves without a writer.
async fn next_command(commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Command> {
    let Some(rx) = commands else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Some(command) => Some(command),
        None => {
            *commands = None;
            std::future::pending().await
        }
    }
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn wait_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => sleep_until(d).await,
        None => std::future::pending().await,
    }
}
