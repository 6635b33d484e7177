//! One bus task: a transport (a serial line or a TCP connection) and the units
//! polled over it, one request at a time.
//!
//! Scheduling is earliest-due-first, so every unit gets its turn whatever the
//! others do. A unit that stops answering costs the bus at most
//! `timeout × (1 + retries)` in the cycle it dies, then is probed with a single
//! attempt per cycle, its polls backed off exponentially (up to
//! [`MAX_BACKOFF`] or its poll interval, whichever is longer) until it answers.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_modbus::client::Context;
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tsgw_core::{ChannelId, Metrics, Origin, Reading, SourceKind, Value};

use crate::config::{ModbusDeviceConfig, PointConfig};
use crate::decode::{decode_point, BlockData, DecodeError};
use crate::link::{unit_unreachable, Endpoint, Failure, Outcome};
use crate::plan::{plan_reads, ReadBlock};
use crate::write::{WriteError, WriteJob, WriteValue};

/// Longest pause between probes of a unit that does not answer (unless its
/// poll interval is longer).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

const SOURCE: &str = "modbus";

/// One device (unit id) on a bus and its polling state.
pub(crate) struct Unit {
    name: String,
    unit_id: u8,
    channel: ChannelId,
    points: Vec<PointConfig>,
    blocks: Vec<ReadBlock>,
    interval: Duration,
    timeout: Duration,
    retries: u32,
    next_due: Instant,
    /// Consecutive cycles that ended without an answer.
    failures: u32,
    /// Per block: whether its last read got an exception (logged once, not every cycle).
    block_failing: Vec<bool>,
    /// What went wrong in the last cycle, in words (for `check-config --test`).
    problems: Vec<String>,
}

impl Unit {
    pub(crate) fn new(cfg: &ModbusDeviceConfig) -> Self {
        let blocks = plan_reads(&cfg.points, cfg.max_gap);
        Unit {
            name: cfg.name.clone(),
            unit_id: cfg.unit_id,
            channel: cfg.channel,
            block_failing: vec![false; blocks.len()],
            blocks,
            points: cfg.points.clone(),
            interval: Duration::from_millis(cfg.poll_interval_ms),
            timeout: Duration::from_millis(cfg.timeout_ms),
            retries: cfg.retries,
            next_due: Instant::now(),
            failures: 0,
            problems: Vec::new(),
        }
    }

    /// Pause after the `failures`-th failed cycle in a row.
    fn backoff(&self) -> Duration {
        let cap = MAX_BACKOFF.max(self.interval);
        let factor = 1u32 << self.failures.min(16);
        self.interval.saturating_mul(factor).min(cap)
    }
}

/// The readings channel is closed: the gateway is shutting down.
struct Closed;

pub(crate) struct Bus {
    endpoint: Endpoint,
    units: Vec<Unit>,
    ctx: Option<Context>,
    last_request: Option<Instant>,
    readings: mpsc::Sender<Reading>,
    metrics: Metrics,
    /// Writes to this bus's units (downlink), taken between polls.
    writes: Option<mpsc::Receiver<WriteJob>>,
}

impl Bus {
    pub(crate) fn new(
        endpoint: Endpoint,
        units: Vec<Unit>,
        readings: mpsc::Sender<Reading>,
        metrics: Metrics,
    ) -> Self {
        for unit in &units {
            // Make the gauge visible (as down) before the first poll.
            metrics
                .device_up
                .with_label_values(&[SOURCE, &unit.name])
                .set(0);
        }
        Bus {
            endpoint,
            units,
            ctx: None,
            last_request: None,
            readings,
            metrics,
            writes: None,
        }
    }

    pub(crate) fn with_writes(mut self, writes: mpsc::Receiver<WriteJob>) -> Self {
        self.writes = Some(writes);
        self
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let Some(index) = self.next_unit() else {
                return;
            };
            let due = self.units[index].next_due;
            // A write waiting goes before the next poll, never into one.
            let job = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                job = next_write(&mut self.writes) => job,
                () = sleep_until(due) => None,
            };
            if let Some(job) = job {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = self.write(job) => {}
                }
                continue;
            }
            let polled = tokio::select! {
                // Shutdown first: a cancelled bus starts no new exchange.
                biased;
                () = shutdown.cancelled() => break,
                polled = async {
                    sleep_until(due).await;
                    self.poll(index).await
                } => polled,
            };
            if polled.is_err() {
                debug!(
                    bus = self.endpoint.label(),
                    "readings channel closed; stopping"
                );
                break;
            }
        }
        self.close().await;
    }

    /// Closes the connection or port, if open.
    pub(crate) async fn close(&mut self) {
        if let Some(mut ctx) = self.ctx.take() {
            use tokio_modbus::client::Client as _;
            // Best effort: a polite close; the drop closes the socket or port anyway.
            let _ = tokio::time::timeout(Duration::from_secs(1), ctx.disconnect()).await;
        }
    }

    /// One poll cycle of unit `index` now, and what went wrong in it.
    pub(crate) async fn poll_once_for_report(&mut self, index: usize) -> Vec<String> {
        // The readings channel has room for the whole cycle, so it cannot be closed.
        let _ = self.poll(index).await;
        self.units
            .get_mut(index)
            .map(|u| std::mem::take(&mut u.problems))
            .unwrap_or_default()
    }

    fn next_unit(&self) -> Option<usize> {
        (0..self.units.len()).min_by_key(|&i| self.units[i].next_due)
    }

    fn count_error(&self, device: &str, kind: &str) {
        self.metrics
            .device_errors_total
            .with_label_values(&[SOURCE, device, kind])
            .inc();
    }

    /// One poll cycle of one unit: every block, in plan order.
    async fn poll(&mut self, index: usize) -> Result<(), Closed> {
        let measured_at = Utc::now();
        let unit = &self.units[index];
        let name = unit.name.clone();
        // A unit already failing gets a single probe, so it cannot hog a shared bus.
        let attempts = if unit.failures == 0 {
            unit.retries.saturating_add(1)
        } else {
            1
        };
        let blocks = unit.blocks.clone();
        self.units[index].problems.clear();
        let mut answered = false;
        let mut failure: Option<(Failure, String)> = None;
        for (b, block) in blocks.iter().enumerate() {
            let outcome = self.request(index, block, attempts).await;
            let was_failing = self.units[index]
                .block_failing
                .get(b)
                .copied()
                .unwrap_or(false);
            if let Some(flag) = self.units[index].block_failing.get_mut(b) {
                *flag = matches!(outcome, Outcome::Exception(_));
            }
            let outcome = match outcome {
                // A gateway saying its target is unreachable is the unit not answering.
                Outcome::Exception(code) if unit_unreachable(code) => {
                    self.count_error(&name, "exception");
                    Outcome::Failed(
                        Failure::Unreachable,
                        format!("gateway reports exception {code:?}"),
                    )
                }
                other => other,
            };
            if !answered && matches!(outcome, Outcome::Data(_) | Outcome::Exception(_)) {
                // Up as soon as it answers, before its readings go out.
                self.metrics
                    .device_up
                    .with_label_values(&[SOURCE, &name])
                    .set(1);
            }
            match outcome {
                Outcome::Data(data) => {
                    if was_failing {
                        info!(device = %name, "{} {} readable again", block.kind.describe(), block.start);
                    }
                    answered = true;
                    emit(
                        &self.units[index],
                        &self.metrics,
                        &self.readings,
                        block,
                        &data,
                        measured_at,
                    )
                    .await?;
                }
                Outcome::Exception(code) => {
                    answered = true;
                    self.count_error(&name, "exception");
                    let message = format!(
                        "exception {code:?} reading {} {}..{}; its points are skipped",
                        block.kind.describe(),
                        block.start,
                        u32::from(block.start) + u32::from(block.count)
                    );
                    if was_failing {
                        debug!(device = %name, "{message}");
                    } else {
                        warn!(device = %name, "{message}");
                    }
                    self.units[index].problems.push(message);
                }
                Outcome::Failed(kind, message) => {
                    // The unit (or the link) is gone: leave the bus to the others.
                    failure = Some((kind, message));
                    break;
                }
            }
        }

        let now = Instant::now();
        let up = self.metrics.device_up.with_label_values(&[SOURCE, &name]);
        let unit = &mut self.units[index];
        match failure {
            None => {
                if unit.failures > 0 {
                    info!(device = %name, "answering again");
                }
                unit.failures = 0;
                unit.next_due = (unit.next_due + unit.interval).max(now);
            }
            Some((kind, message)) => {
                unit.problems
                    .push(format!("not answering: {} ({message})", kind.kind()));
                unit.failures = unit.failures.saturating_add(1);
                up.set(0);
                let backoff = unit.backoff();
                if unit.failures == 1 {
                    warn!(device = %name, bus = self.endpoint.label(), kind = kind.kind(),
                        answered, "not answering ({message}); retrying in {backoff:?}");
                } else {
                    debug!(device = %name, kind = kind.kind(), failures = unit.failures,
                        "still not answering ({message}); retrying in {backoff:?}");
                }
                unit.next_due = now + backoff;
            }
        }
        Ok(())
    }

    /// One block read with up to `attempts` tries, (re)opening the link as needed.
    async fn request(&mut self, index: usize, block: &ReadBlock, attempts: u32) -> Outcome {
        let unit_id = self.units[index].unit_id;
        let timeout = self.units[index].timeout;
        let name = self.units[index].name.clone();
        let mut last = Outcome::Failed(Failure::Io, "no attempt made".to_owned());
        for _ in 0..attempts {
            let ctx = match self.ctx.take() {
                Some(ctx) => ctx,
                None => match self.endpoint.open(timeout).await {
                    Ok(ctx) => {
                        info!(bus = self.endpoint.label(), "opened");
                        ctx
                    }
                    Err(err) => {
                        // A failed connect is not retried within the cycle: the
                        // backoff paces reconnects.
                        self.count_error(&name, Failure::Io.kind());
                        return Outcome::Failed(
                            Failure::Io,
                            format!("cannot open {}: {err}", self.endpoint.label()),
                        );
                    }
                },
            };
            let mut ctx = ctx;
            quiet_time(self.endpoint.inter_frame_delay(), self.last_request).await;
            ctx.set_slave(Slave(unit_id));
            let outcome = self.endpoint.read(&mut ctx, block, timeout).await;
            self.last_request = Some(Instant::now());
            match outcome {
                Outcome::Failed(failure, message) => {
                    self.count_error(&name, failure.kind());
                    debug!(device = %name, kind = failure.kind(), "request failed: {message}");
                    if !self.endpoint.must_reopen_after(failure) {
                        self.ctx = Some(ctx);
                    }
                    last = Outcome::Failed(failure, message);
                }
                answer => {
                    self.ctx = Some(ctx);
                    return answer;
                }
            }
        }
        last
    }
}

/// The next write, if any; never resolves once every writer is gone.
async fn next_write(writes: &mut Option<mpsc::Receiver<WriteJob>>) -> Option<WriteJob> {
    let Some(rx) = writes else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Some(job) => Some(job),
        None => {
            *writes = None;
            std::future::pending().await
        }
    }
}

impl Bus {
    /// One write and its read-back, for a unit of this bus. Single attempt.
    async fn write(&mut self, job: WriteJob) {
        let result = self.write_and_check(job.unit, &job.value).await;
        if let Some(unit) = self.units.get(job.unit) {
            match &result {
                Ok(()) => {
                    info!(device = %unit.name, target = %job.value.describe(), "written and read back")
                }
                Err(e) => {
                    self.count_error(&unit.name.clone(), &format!("write_{}", e.reason()));
                    warn!(device = %unit.name, target = %job.value.describe(), error = %e, "write failed");
                }
            }
        }
        let _ = job.reply.send(result);
    }

    async fn write_and_check(
        &mut self,
        index: usize,
        value: &WriteValue,
    ) -> Result<(), WriteError> {
        use tokio_modbus::{Request, Response};
        let unit = self.units.get(index).ok_or(WriteError::Stopped)?;
        let (unit_id, timeout) = (unit.unit_id, unit.timeout);
        let mut ctx = match self.ctx.take() {
            Some(ctx) => ctx,
            None => self.endpoint.open(timeout).await.map_err(|e| {
                WriteError::Link(format!("cannot open {}: {e}", self.endpoint.label()))
            })?,
        };
        ctx.set_slave(Slave(unit_id));
        let (write, read) = match value {
            WriteValue::Registers { address, words } if words.len() == 1 => (
                Request::WriteSingleRegister(*address, words[0]),
                Request::ReadHoldingRegisters(*address, 1),
            ),
            WriteValue::Registers { address, words } => (
                Request::WriteMultipleRegisters(*address, words.clone().into()),
                Request::ReadHoldingRegisters(*address, words.len() as u16),
            ),
            WriteValue::Coil { address, value } => (
                Request::WriteSingleCoil(*address, *value),
                Request::ReadCoils(*address, 1),
            ),
        };
        let mut exchange = async |request| {
            quiet_time(self.endpoint.inter_frame_delay(), self.last_request).await;
            let answer = self.endpoint.call(&mut ctx, request, timeout).await;
            self.last_request = Some(Instant::now());
            answer
        };
        let failed = |outcome: Outcome| match outcome {
            Outcome::Exception(code) => WriteError::Exception(format!("{code:?}")),
            Outcome::Failed(Failure::Timeout, _) => WriteError::Timeout(timeout),
            Outcome::Failed(_, message) => WriteError::Link(message),
            Outcome::Data(_) => WriteError::Link("unexpected data".into()),
        };
        let result = match exchange(write).await {
            Err(outcome) => Err(failed(outcome)),
            Ok(_) => match exchange(read).await {
                Err(outcome) => Err(failed(outcome)),
                Ok(response) => {
                    let (wrote, got): (Vec<u16>, Vec<u16>) = match (value, response) {
                        (
                            WriteValue::Registers { words, .. },
                            Response::ReadHoldingRegisters(read),
                        ) => (words.clone(), read),
                        (WriteValue::Coil { value, .. }, Response::ReadCoils(bits)) => (
                            vec![u16::from(*value)],
                            bits.first().map(|b| u16::from(*b)).into_iter().collect(),
                        ),
                        (_, other) => {
                            return self.keep(
                                ctx,
                                Err(WriteError::Link(format!(
                                    "read-back answer {other:?} does not match the request"
                                ))),
                            );
                        }
                    };
                    if wrote == got {
                        Ok(())
                    } else {
                        Err(WriteError::ReadBack { wrote, read: got })
                    }
                }
            },
        };
        self.keep(ctx, result)
    }

    /// Keeps the link for the next request unless the failure calls for a new one.
    fn keep(
        &mut self,
        ctx: tokio_modbus::client::Context,
        result: Result<(), WriteError>,
    ) -> Result<(), WriteError> {
        let reopen = match &result {
            Err(WriteError::Timeout(_)) => self.endpoint.must_reopen_after(Failure::Timeout),
            Err(WriteError::Link(_)) => true,
            _ => false,
        };
        if !reopen {
            self.ctx = Some(ctx);
        }
        result
    }
}

/// Keeps the configured silence between the end of one exchange and the next request.
async fn quiet_time(delay: Duration, last_request: Option<Instant>) {
    if delay.is_zero() {
        return;
    }
    match last_request {
        Some(last) => sleep_until(last + delay).await,
        None => sleep(delay).await,
    }
}

/// Decodes the block's points and sends their readings.
async fn emit(
    unit: &Unit,
    metrics: &Metrics,
    readings: &mpsc::Sender<Reading>,
    block: &ReadBlock,
    data: &BlockData,
    measured_at: DateTime<Utc>,
) -> Result<(), Closed> {
    for &i in &block.points {
        let Some(point) = unit.points.get(i) else {
            continue;
        };
        let value = match decode_point(point, block.start, data) {
            Ok(value) => value,
            Err(err) => {
                let reason = match err {
                    DecodeError::NotFinite(_) => "not_finite",
                    DecodeError::Short { .. } | DecodeError::WrongTable => "decode",
                };
                metrics
                    .parse_errors_total
                    .with_label_values(&[SOURCE, &unit.name, reason])
                    .inc();
                debug!(device = %unit.name, "{}: {err}", point.describe(i));
                continue;
            }
        };
        let reading = Reading {
            channel: point.channel.unwrap_or(unit.channel),
            target: point.target,
            value: Value::Number(value),
            measured_at,
            origin: Origin::new(SourceKind::Modbus, unit.name.clone()),
        };
        readings.send(reading).await.map_err(|_| Closed)?;
        metrics
            .readings_total
            .with_label_values(&[SOURCE, &unit.name, "accepted"])
            .inc();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(interval_ms: u64, failures: u32) -> Unit {
        let cfg: ModbusDeviceConfig = serde_json_like();
        let mut u = Unit::new(&cfg);
        u.interval = Duration::from_millis(interval_ms);
        u.failures = failures;
        u
    }

    fn serde_json_like() -> ModbusDeviceConfig {
        toml::from_str(
            r#"
            name = "d"
            unit_id = 1
            channel = 1
            transport.tcp.address = "127.0.0.1:1"
            points = [{ kind = "input", address = 0, type = "u16", target = "field1" }]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(unit(1000, 1).backoff(), Duration::from_secs(2));
        assert_eq!(unit(1000, 3).backoff(), Duration::from_secs(8));
        assert_eq!(unit(1000, 10).backoff(), MAX_BACKOFF);
        assert_eq!(unit(1000, u32::MAX).backoff(), MAX_BACKOFF);
        // A slow poll interval is never polled faster than configured.
        assert_eq!(unit(60_000, 5).backoff(), Duration::from_secs(60));
    }
}
