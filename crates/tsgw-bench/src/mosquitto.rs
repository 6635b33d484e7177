//! `tsgw-bench compare-mosquitto`: Debian's mosquitto as the local broker,
//! bridged to the emulator, against tsgw doing the same job (drop-in
//! ThingSpeak topics from local devices), same load, same machine.
//!
//! mosquitto keeps nothing on disk between its autosaves and has no notion of
//! ThingSpeak's rate limit, so "ingested" for it means messages its broker
//! received (`$SYS/broker/publish/messages/received`, updated every second),
//! while for tsgw it means readings accepted into the pipeline to the durable
//! queue. The bridge attempts come first: each bridge configuration is
//! started against the emulator and what the emulator saw is reported.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use thingspeak_emulator::EmulatorHandle;

use tsgw_testkit::{channel, emulator, Device, CLIENT_ID, PASSWORD, USERNAME};

use crate::harness::{self, mib};
use crate::ingest::{probe_metric, qos_of, start_gateway, Upstream};
use crate::load::{self, LoadOutcome, LoadSpec, Probe};
use crate::stats::Table;

#[derive(clap::Args, Debug, Clone)]
pub struct MosquittoArgs {
    /// Path of the mosquitto broker.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: PathBuf,
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Offered rate of the paced cases, readings/s (the floods follow).
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Measured seconds per case.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Only try the bridge configurations, skip the load comparison.
    #[arg(long)]
    pub bridge_only: bool,
    /// Idle CPU window, seconds.
    #[arg(long, default_value_t = 20)]
    pub idle_seconds: u64,
}

fn dropin_topic(publisher: usize, _n: u64) -> String {
    format!(
        "channels/{}/publish/fields/field{}",
        1001,
        publisher % 8 + 1
    )
}

fn dropin_payload(_publisher: usize, n: u64) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// The bridge settings tried, in order: mosquitto's defaults first, the
/// full ThingSpeak-compatible set last (the load runs use the first that works).
const BRIDGES: [(&str, &str); 4] = [
    ("mosquitto defaults", ""),
    ("try_private false", "try_private false\n"),
    (
        "try_private false, cleansession true",
        "try_private false\ncleansession true\n",
    ),
    (
        "ThingSpeak-compatible",
        "bridge_protocol_version mqttv311\ntry_private false\ncleansession true\nnotifications false\n",
    ),
];

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Mosquitto {
    fn start(binary: &Path, dir: &Path, emu: &EmulatorHandle, bridge_extra: &str) -> Result<Self> {
        let port = free_port()?;
        let upstream = emu.tcp_addr().context("emulator has no TCP listener")?;
        let log = dir.join("mosquitto.log");
        let _ = std::fs::remove_file(&log);
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 sys_interval 1\nlog_dest file {log}\nlog_type all\n\
                 connection thingspeak\naddress {upstream}\ntopic channels/# out 0\n\
                 remote_clientid {CLIENT_ID}\nremote_username {USERNAME}\nremote_password {PASSWORD}\n\
                 restart_timeout 1\n{bridge_extra}",
                log = log.display()
            ),
        )?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("mosquitto did not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { child, addr, log })
    }

    fn log_lines(&self, needle: &[&str]) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| needle.iter().any(|n| l.contains(n)))
            .map(|l| l.split_once(": ").map(|(_, m)| m).unwrap_or(l).to_owned())
            .collect()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Follows mosquitto's received-publish counter through `$SYS`.
async fn sys_probe(broker: SocketAddr, id: &str) -> Result<Probe> {
    let received = Arc::new(AtomicU64::new(0));
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe("$SYS/broker/publish/messages/received", QoS::AtMostOnce)
        .await
        .map_err(|e| anyhow!("subscribe: {e}"))?;
    let sink = received.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(v) = std::str::from_utf8(&p.payload)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                    {
                        sink.store(v, Ordering::Relaxed);
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map_err(|_| anyhow!("no $SYS counter from mosquitto"))??;
    Ok(Box::new(move || {
        let v = received.load(Ordering::Relaxed) as f64;
        Box::pin(async move { Ok(v) })
    }))
}

/// The cases both brokers run: (QoS, offered rate or flood).
fn cases(rate: f64) -> Vec<(u8, Option<f64>)> {
    vec![(0, Some(rate)), (1, Some(rate)), (0, None), (1, None)]
}

fn spec(publishers: usize, qos: u8, rate: Option<f64>, seconds: u64) -> LoadSpec {
    LoadSpec {
        publishers,
        qos: qos_of(qos),
        rate,
        warmup: Duration::from_secs(2),
        duration: Duration::from_secs(seconds),
        topic: dropin_topic,
        payload: dropin_payload,
    }
}

async fn idle_cpu(pid: u32, secs: u64) -> Result<f64> {
    let t0 = harness::cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    Ok((harness::cpu_ticks(pid)? - t0) as f64 / harness::clock_ticks_per_sec() / secs as f64)
}

pub async fn run(args: MosquittoArgs, binary: PathBuf) -> Result<String> {
    if !args.mosquitto.exists() {
        bail!(
            "{} not found: apt-get install -y mosquitto",
            args.mosquitto.display()
        );
    }
    let emu = emulator(Duration::from_secs(1)).await?;
    let dir = tempfile::tempdir()?;
    let mut report = format!(
        "### compare-mosquitto\n\n{}\n\n",
        harness::machine_summary()
    );

    // 1. Does a mosquitto bridge get into (emulated) ThingSpeak at all?
    let mut bridges = Table::new(&[
        "bridge config",
        "emulator saw",
        "mosquitto log",
        "bridged entries",
    ]);
    let mut working = None;
    for (name, extra) in BRIDGES {
        emu.clear_faults();
        let before = emu.counters();
        let entries_before = emu.entries(channel(1001)).len();
        let m = Mosquitto::start(&args.mosquitto, dir.path(), &emu, extra)?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let dev = Device::connect(m.addr, "bridge-probe", 10).await?;
        dev.publish(
            "channels/1001/publish/fields/field1",
            QoS::AtLeastOnce,
            b"42".to_vec(),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = emu.counters();
        let entries = emu.entries(channel(1001)).len() - entries_before;
        let log = m.log_lines(&[
            "refused",
            "Connection Refused",
            "disconnect",
            "Socket error",
        ]);
        bridges.row(vec![
            name.into(),
            format!(
                "sessions +{}, refusals +{}, closed invalid +{}, publishes +{}",
                after.sessions - before.sessions,
                after.refusals - before.refusals,
                after.closed_invalid - before.closed_invalid,
                after.publishes - before.publishes
            ),
            log.iter()
                .take(4)
                .map(|l| l.replace('|', "/"))
                .collect::<Vec<_>>()
                .join("; "),
            entries.to_string(),
        ]);
        if entries > 0 && working.is_none() {
            working = Some(extra);
        }
        drop(dev);
        drop(m);
    }
    report.push_str(&format!(
        "Bridge to the emulator:\n\n{}\n\n",
        bridges.render()
    ));
    if args.bridge_only {
        return Ok(report);
    }
    let extra = working.unwrap_or(BRIDGES[BRIDGES.len() - 1].1);

    // 2. Same load, both brokers, upstream connected.
    let mut table = Table::new(&["figure", "tsgw", "mosquitto + bridge", "tsgw / mosquitto"]);
    let m = Mosquitto::start(&args.mosquitto, dir.path(), &emu, extra)?;
    let m_pid = m.child.id();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m_idle_rss = harness::rss_kib(m_pid)?;
    let m_idle_cpu = idle_cpu(m_pid, args.idle_seconds).await?;
    let mut m_runs: Vec<LoadOutcome> = Vec::new();
    for (i, (qos, rate)) in cases(args.rate).into_iter().enumerate() {
        let probe = sys_probe(m.addr, &format!("bench-sys-{i}")).await?;
        m_runs.push(
            load::run(
                m.addr,
                &spec(args.publishers, qos, rate, args.seconds),
                probe,
                Duration::from_millis(50),
                Duration::from_secs(3),
                Some(m_pid),
            )
            .await?,
        );
    }
    drop(m);

    let gdir = tempfile::tempdir()?;
    emu.clear_faults();
    let gateway = start_gateway(&binary, &emu, gdir.path())?;
    let g_pid = gateway.pid();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let g_idle_rss = harness::rss_kib(g_pid)?;
    let g_idle_cpu = idle_cpu(g_pid, args.idle_seconds).await?;
    let mut g_runs: Vec<LoadOutcome> = Vec::new();
    for (qos, rate) in cases(args.rate) {
        g_runs.push(
            load::run(
                gateway.mqtt,
                &spec(args.publishers, qos, rate, args.seconds),
                probe_metric(&gateway, Upstream::Up),
                Duration::from_millis(20),
                Duration::from_secs(5),
                Some(g_pid),
            )
            .await?,
        );
    }
    gateway.kill();

    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "n/a".into()
        }
    };
    table.row(vec![
        "RSS idle".into(),
        format!("{:.1} MiB", mib(g_idle_rss)),
        format!("{:.1} MiB", mib(m_idle_rss)),
        ratio(g_idle_rss as f64, m_idle_rss as f64),
    ]);
    table.row(vec![
        format!("CPU idle ({} s)", args.idle_seconds),
        format!("{:.2} %", g_idle_cpu * 100.0),
        format!("{:.2} %", m_idle_cpu * 100.0),
        ratio(g_idle_cpu, m_idle_cpu),
    ]);
    for (i, (qos, rate)) in cases(args.rate).into_iter().enumerate() {
        let (g, m) = (&g_runs[i], &m_runs[i]);
        let load = rate
            .map(|r| format!("QoS {qos} at {r:.0}/s"))
            .unwrap_or_else(|| format!("QoS {qos} flood ×{}", args.publishers));
        table.row(vec![
            format!("{load}: ingested/s"),
            format!("{:.0}", g.done_rate()),
            format!("{:.0}", m.done_rate()),
            ratio(g.done_rate(), m.done_rate()),
        ]);
        table.row(vec![
            format!("{load}: CPU"),
            format!("{:.0} %", g.cpu_share * 100.0),
            format!("{:.0} %", m.cpu_share * 100.0),
            ratio(g.cpu_share, m.cpu_share),
        ]);
        table.row(vec![
            format!("{load}: peak RSS"),
            format!("{:.1} MiB", mib(g.peak_rss_kib)),
            format!("{:.1} MiB", mib(m.peak_rss_kib)),
            ratio(g.peak_rss_kib as f64, m.peak_rss_kib as f64),
        ]);
    }
    report.push_str(&format!(
        "Same load (drop-in topics `channels/1001/publish/fields/fieldN`, {} publishers, {} s per case; \
         CPU in % of one core):\n\n{}\n\n\
         tsgw \"ingested\" = readings accepted towards its durable queue; mosquitto \"ingested\" = \
         PUBLISHes its broker received ($SYS, 1 s resolution). mosquitto stores nothing durably \
         (persistence off; with it on it still only autosaves) and forwards at the line rate, \
         which ThingSpeak's rate limit drops: emulator dropped_rate_limit = {}.\n",
        args.publishers,
        args.seconds,
        table.render(),
        emu.counters().dropped_rate_limit
    ));
    Ok(report)
}
