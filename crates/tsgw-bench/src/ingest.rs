//! `tsgw-bench ingest`: local MQTT publishers → the durable queue.
//!
//! How latency is measured: every publisher counts PUBLISH packets as rumqttc
//! writes them (the "sent" curve, sampled each 1 ms); the gateway's
//! `tsgw_queue_readings` gauge, which the queue sets inside `push`, is scraped
//! every `--scrape-ms` (the "queued" curve). With upstream refused nothing
//! leaves the queue, so that gauge counts pushes exactly. The latency of the
//! k-th reading is the time between the sent curve reaching k and the queued
//! curve reaching k: exact if readings stay in order (one broker, one writer),
//! and its mean is the true mean regardless (Little's law). The scrape period
//! bounds the resolution (linear interpolation inside it). Durability adds
//! up to `queue.flush_interval_ms` on top (sled's fsync runs on that timer).
//! With upstream connected the forwarder removes readings, so there the
//! curve is `tsgw_readings_total{result="accepted"}` (readings handed to the
//! queue writer's bounded channel of 16 Ki readings) instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rumqttc::QoS;
use thingspeak_emulator::EmulatorHandle;

use tsgw_testkit::{emulator, http_get, metric_sum, Gateway};

use crate::harness::{self, gateway_config};
use crate::load::{self, LoadOutcome, LoadSpec, Probe};
use crate::stats::{curve_latencies, ms, percentile, Table};

#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    /// Publishers (one MQTT connection each).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Measured seconds per case (after 2 s of warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Offered rates of the paced cases, readings/s across all publishers.
    #[arg(long, value_delimiter = ',', default_values_t = vec![20_000.0, 40_000.0])]
    pub rate: Vec<f64>,
    /// Also run unpaced floods. On a 2-core machine the publishers then take
    /// the CPU the gateway needs, so these measure the bench more than tsgw.
    #[arg(long)]
    pub flood: bool,
    /// Scrape period of /metrics, ms (the latency resolution).
    #[arg(long, default_value_t = 5)]
    pub scrape_ms: u64,
    /// Only these QoS levels (0, 1).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0u8, 1u8])]
    pub qos: Vec<u8>,
}

pub fn bench_topic(publisher: usize, _n: u64) -> String {
    format!("bench/p{publisher}")
}

pub fn bench_payload(_publisher: usize, n: u64) -> Vec<u8> {
    format!("{{\"v\":{n}}}").into_bytes()
}

#[derive(Clone, Copy, PartialEq)]
pub enum Upstream {
    /// Connected, 1 s rate limit: the forwarder drains while readings come in.
    Up,
    /// Refused: nothing leaves the queue, so its gauge counts pushes.
    Down,
}

pub fn qos_of(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Starts a fresh gateway (own queue dir) against `emu`.
pub fn start_gateway(
    binary: &std::path::Path,
    emu: &EmulatorHandle,
    dir: &std::path::Path,
) -> Result<Gateway> {
    let config = gateway_config(emu, &dir.join("queue"), 1.0, 1000)?;
    harness::start_gateway(binary, &config, dir)
}

pub fn probe_metric(gateway: &Gateway, upstream: Upstream) -> Probe {
    let addr = gateway.http;
    Box::new(move || {
        Box::pin(async move {
            let (_, text) = http_get(addr, "/metrics", Duration::from_secs(10)).await?;
            Ok(match upstream {
                Upstream::Down => metric_sum(&text, "tsgw_queue_readings", &[]),
                Upstream::Up => metric_sum(&text, "tsgw_readings_total", &["result=\"accepted\""]),
            })
        })
    })
}

pub struct CaseResult {
    pub outcome: LoadOutcome,
    pub latencies: Vec<f64>,
}

pub async fn run_case(
    binary: &std::path::Path,
    emu: &EmulatorHandle,
    upstream: Upstream,
    spec: &LoadSpec,
    scrape: Duration,
) -> Result<CaseResult> {
    let dir = tempfile::tempdir()?;
    if upstream == Upstream::Down {
        emu.refuse_connections_for(Duration::from_secs(3600));
        emu.drop_all_connections();
    } else {
        emu.clear_faults();
    }
    let gateway = start_gateway(binary, emu, dir.path())?;
    let probe = probe_metric(&gateway, upstream);
    let outcome = load::run(
        gateway.mqtt,
        spec,
        probe,
        scrape,
        Duration::from_secs(5),
        Some(gateway.pid()),
    )
    .await?;
    let step = (outcome.done_total as usize / 20_000).max(1);
    let latencies = curve_latencies(&outcome.sent, &outcome.done, step);
    gateway.kill();
    emu.clear_faults();
    Ok(CaseResult { outcome, latencies })
}

pub async fn run(args: IngestArgs, binary: PathBuf) -> Result<String> {
    let emu = Arc::new(emulator(Duration::from_secs(1)).await?);
    let mut table = Table::new(&[
        "QoS",
        "offered",
        "upstream",
        "sent/s",
        "ingested/s",
        "latency to",
        "p50",
        "p99",
        "max",
        "not ingested",
        "gateway CPU",
        "peak RSS",
        "load avg",
    ]);
    for &level in &args.qos {
        let mut rates: Vec<Option<f64>> = args.rate.iter().copied().map(Some).collect();
        if args.flood {
            rates.insert(0, None);
        }
        for &rate in &rates {
            for upstream in [Upstream::Down, Upstream::Up] {
                let spec = LoadSpec {
                    publishers: args.publishers,
                    qos: qos_of(level),
                    rate,
                    warmup: Duration::from_secs(2),
                    duration: Duration::from_secs(args.seconds),
                    topic: bench_topic,
                    payload: bench_payload,
                };
                let load_avg = harness::load_average();
                let r = run_case(
                    &binary,
                    &emu,
                    upstream,
                    &spec,
                    Duration::from_millis(args.scrape_ms),
                )
                .await?;
                let o = &r.outcome;
                table.row(vec![
                    level.to_string(),
                    rate.map(|r| format!("{r:.0}/s"))
                        .unwrap_or_else(|| format!("flood ×{}", args.publishers)),
                    match upstream {
                        Upstream::Up => "up, 1 s".into(),
                        Upstream::Down => "refused".into(),
                    },
                    format!("{:.0}", o.sent_rate()),
                    format!("{:.0}", o.done_rate()),
                    match upstream {
                        Upstream::Up => "accepted".into(),
                        Upstream::Down => "queue".into(),
                    },
                    ms(percentile(&r.latencies, 50.0)),
                    ms(percentile(&r.latencies, 99.0)),
                    ms(percentile(&r.latencies, 100.0)),
                    format!("{:.0}", (o.sent_total as f64 - o.done_total).max(0.0)),
                    format!("{:.0} %", o.cpu_share * 100.0),
                    format!("{:.1} MiB", harness::mib(o.peak_rss_kib)),
                    load_avg,
                ]);
                eprintln!("{}", table.render());
            }
        }
    }
    Ok(format!(
        "### ingest ({} publishers, {} s per case, JSON rule, one reading per message)\n\n{}\n\n{}\n",
        args.publishers,
        args.seconds,
        harness::machine_summary(),
        table.render()
    ))
}
