//! `tsgw-bench e2e-latency`: one device publishes a unique value, spaced wider
//! than the rate limit (so nothing merges or waits for a window), and the
//! bench polls the in-process emulator every millisecond until the entry is
//! there. Latency = entry visible − publish call. The forwarder sends a
//! channel's readings per closed rate-limit window (at least 1 s, aligned to
//! Unix seconds, closed 250 ms after its end), so by design this is about
//! 0.25 to 1.25 s plus transport.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rumqttc::QoS;

use tsgw_testkit::{channel, emulator, Device};

use crate::harness::{self, gateway_config, start_gateway, WAIT};
use crate::stats::{ms, percentile, Table};

#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    /// Readings sent, one at a time.
    #[arg(long, default_value_t = 100)]
    pub samples: u32,
    /// Rate limit of the emulator and the gateway, seconds (gateway minimum 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub interval: f64,
    /// Shortest pause between readings, ms; a random 0..1000 ms is added so
    /// samples fall at every phase of the forwarder's 1 s windows.
    #[arg(long, default_value_t = 250)]
    pub gap_ms: u64,
}

pub async fn run(args: LatencyArgs, binary: PathBuf) -> Result<String> {
    let emu = emulator(Duration::from_secs_f64(args.interval)).await?;
    let dir = tempfile::tempdir()?;
    let config = gateway_config(&emu, &dir.path().join("queue"), args.interval, 1000)?;
    let gateway = start_gateway(&binary, &config, dir.path())?;
    let device = Device::connect(gateway.mqtt, "latency-device", 10).await?;
    // Let the forwarder connect before the first sample.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ch = channel(1001);
    let mut by_qos = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let mut latencies = Vec::new();
        for i in 0..args.samples {
            // Unique and plain (no leading zero), so the number comes back as sent.
            let value = format!("{}", (u64::from(qos as u8) + 1) * 1_000_000 + u64::from(i));
            let wanted: f64 = (u64::from(qos as u8) + 1) as f64 * 1_000_000.0 + f64::from(i);
            let sent = Instant::now();
            device
                .publish(
                    "channels/1001/publish/fields/field1",
                    qos,
                    value.clone().into_bytes(),
                )
                .await?;
            loop {
                let seen = emu
                    .entries(ch)
                    .last()
                    .and_then(|e| e.field(1).and_then(|v| v.parse::<f64>().ok()))
                    .is_some_and(|v| v == wanted);
                if seen {
                    latencies.push(sent.elapsed().as_secs_f64());
                    break;
                }
                if sent.elapsed() > WAIT {
                    bail!("reading {value} never reached the emulator");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..1000);
            tokio::time::sleep(Duration::from_millis(args.gap_ms + jitter)).await;
        }
        by_qos.push((qos, latencies));
    }
    let counters = emu.counters();
    gateway.kill();

    let mut table = Table::new(&["QoS", "samples", "p50", "p90", "p99", "max"]);
    for (qos, l) in &by_qos {
        table.row(vec![
            (*qos as u8).to_string(),
            l.len().to_string(),
            ms(percentile(l, 50.0)),
            ms(percentile(l, 90.0)),
            ms(percentile(l, 99.0)),
            ms(percentile(l, 100.0)),
        ]);
    }
    Ok(format!(
        "### e2e-latency (device → gateway → TLS → emulator entry; interval {} s, gap {} ms)\n\n{}\n\n{}\n\nemulator: {} publishes dropped by its rate limit.\n",
        args.interval,
        args.gap_ms,
        harness::machine_summary(),
        table.render(),
        counters.dropped_rate_limit
    ))
}
