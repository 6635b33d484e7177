//! `tsgw-bench`: load, benchmark and reliability harnesses for the release
//! `tsgw` binary. Each subcommand prints a Markdown table (progress goes to
//! stderr, the final table to stdout) for the README.

mod burst;
mod crash;
mod e2e_latency;
mod harness;
mod ingest;
mod load;
mod mosquitto;
mod outage;
mod resources;
mod stats;
mod wear;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The tsgw binary to measure (default: `tsgw` next to this binary, i.e.
    /// target/release/tsgw after `cargo build --release -p tsgw -p tsgw-bench`).
    #[arg(long, global = true)]
    tsgw: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sustained readings/s from local MQTT publishers into the durable queue, and latency.
    Ingest(ingest::IngestArgs),
    /// A 1M-publish QoS 0 burst (exact accounting, peak RSS, CPU) next to mosquitto, and QoS 1 with acks after fsync.
    Burst(burst::BurstArgs),
    /// RSS idle and under load, idle CPU, binary size, startup and RSS with a 1M backlog.
    Resources(resources::ResourcesArgs),
    /// Device publish → entry at the (emulated) ThingSpeak, not rate-limited.
    E2eLatency(e2e_latency::LatencyArgs),
    /// SIGKILL under QoS 1 load, restart, check nothing flushed is lost; plus power cuts.
    CrashLoop(crash::CrashArgs),
    /// The same load against Debian's mosquitto bridged to the emulator.
    CompareMosquitto(mosquitto::MosquittoArgs),
    /// A long upstream outage (MQTT and REST cut) under QoS 1 load: nothing lost, backlog drains within the rate limits.
    Outage(outage::OutageArgs),
    /// Bytes written to storage per reading at 1, 10 and 100 readings/s (SD-card wear), default config.
    Wear(wear::WearArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let binary = tsgw_testkit::tsgw_binary(cli.tsgw)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async move {
        match cli.command {
            Cmd::Ingest(a) => ingest::run(a, binary).await,
            Cmd::Burst(a) => burst::run(a, binary).await,
            Cmd::Resources(a) => resources::run(a, binary).await,
            Cmd::E2eLatency(a) => e2e_latency::run(a, binary).await,
            Cmd::CrashLoop(a) => crash::run(a, binary).await,
            Cmd::CompareMosquitto(a) => mosquitto::run(a, binary).await,
            Cmd::Outage(a) => outage::run(a, binary).await,
            Cmd::Wear(a) => wear::run(a, binary).await,
        }
    })?;
    println!("{report}");
    Ok(())
}
