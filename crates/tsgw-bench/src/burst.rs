//! `tsgw-bench burst`: a burst of QoS 0 publishes into tsgw's local broker
//! (every one accounted for: accepted into the queue, or counted), next to
//! mosquitto relaying the same burst to one subscriber, in the same run; then
//! a QoS 1 load whose acks mean "fsynced" (8 devices, 100 in flight each).
//!
//! The publishers are raw MQTT writers (rumqttc's packet codec over a plain
//! socket): they count exactly what they wrote, and cost the machine less
//! than a client library, so the figures are the broker's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Publish, Subscribe};
use rumqttc::mqttbytes::QoS;

use tsgw_testkit::{emulator, metric_sum, qos0_burst, raw_connect};

use crate::harness::{
    self, clock_ticks_per_sec, cpu_ticks, gateway_config, mib, rss_kib, start_gateway,
};
use crate::stats::Table;

#[derive(clap::Args, Debug, Clone)]
pub struct BurstArgs {
    /// QoS 0 publishes in the burst, across all clients.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    /// Publishing connections (the burst is split evenly).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// The mosquitto broker to compare with (skipped if missing).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: PathBuf,
    /// QoS 1 devices.
    #[arg(long, default_value_t = 8)]
    pub qos1_devices: usize,
    /// Unacknowledged QoS 1 publishes each device keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub qos1_in_flight: usize,
    /// Measured seconds of the QoS 1 load.
    #[arg(long, default_value_t = 10)]
    pub qos1_seconds: u64,
}

const TOPIC: &str = "channels/1001/publish";
/// Longest any phase may take.
const PHASE_LIMIT: Duration = Duration::from_secs(600);

/// Peak RSS and CPU of a process over a phase, sampled every 20 ms.
struct Watch {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
    cpu_before: u64,
    pid: u32,
}

impl Watch {
    fn start(pid: u32) -> Result<Watch> {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(rss_kib(pid)?));
        let (s, p) = (stop.clone(), peak_kib.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(Watch {
            stop,
            peak_kib,
            thread,
            cpu_before: cpu_ticks(pid)?,
            pid,
        })
    }

    /// (peak RSS KiB, CPU seconds) since start.
    fn finish(self) -> Result<(u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let cpu = (cpu_ticks(self.pid)? - self.cpu_before) as f64 / clock_ticks_per_sec();
        Ok((self.peak_kib.load(Ordering::Relaxed), cpu))
    }
}

/// A raw subscriber to `channels/#` that counts the PUBLISH packets it gets.
fn counting_subscriber(broker: SocketAddr, received: Arc<AtomicU64>) -> Result<()> {
    let mut socket = raw_connect(broker, "burst-subscriber", PHASE_LIMIT)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = BytesMut::new();
    let mut subscribe = Subscribe::new("channels/#", QoS::AtMostOnce);
    subscribe.pkid = 1; // 0 is not a valid packet id: mosquitto would disconnect
    subscribe.write(&mut buf)?;
    socket.write_all(&buf)?;
    std::thread::spawn(move || {
        let mut pending = BytesMut::with_capacity(256 * 1024);
        let mut chunk = vec![0u8; 128 * 1024];
        while let Ok(n @ 1..) = socket.read(&mut chunk) {
            pending.extend_from_slice(&chunk[..n]);
            while let Ok(header) = rumqttc::mqttbytes::check(pending.iter(), usize::MAX) {
                let frame = pending.split_to(header.frame_length());
                if frame[0] >> 4 == 3 {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok(())
}

/// One QoS 1 device: keeps `in_flight` publishes unacknowledged, counts PUBACKs.
fn qos1_device(
    broker: SocketAddr,
    id: String,
    in_flight: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
) -> Result<()> {
    let mut socket = raw_connect(broker, &id, PHASE_LIMIT)?;
    let mut out = BytesMut::new();
    let mut pending = BytesMut::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let (mut unacked, mut pkid, mut n) = (0usize, 0u16, 0u64);
    while !stop.load(Ordering::Relaxed) {
        while unacked < in_flight {
            pkid = pkid.wrapping_add(1).max(1);
            let mut publish = Publish::new(TOPIC, QoS::AtLeastOnce, format!("field1={n}"));
            publish.pkid = pkid;
            publish.write(&mut out)?;
            unacked += 1;
            n += 1;
        }
        socket.write_all(&out)?;
        out.clear();
        let read = socket.read(&mut chunk)?;
        if read == 0 {
            bail!("{id}: the broker closed the connection");
        }
        pending.extend_from_slice(&chunk[..read]);
        while let Ok(header) = rumqttc::mqttbytes::check(pending.iter(), usize::MAX) {
            let frame = pending.split_to(header.frame_length());
            if frame[0] >> 4 == 4 {
                unacked -= 1;
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// What mosquitto did with the burst.
struct Relay {
    secs: f64,
    peak_kib: u64,
    cpu: f64,
    received: u64,
}

/// A mosquitto broker on a free loopback port.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start(binary: &Path) -> Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Mosquitto {
            child,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(args: BurstArgs, binary: PathBuf) -> Result<String> {
    let per_client = args.messages / args.clients.max(1);
    let total = per_client * args.clients;
    let emu = emulator(Duration::from_secs(1)).await?;
    // Upstream refuses: nothing leaves the queue, so the burst is measured
    // into the queue, without the forwarder's share of the CPU.
    emu.refuse_connections_for(Duration::from_secs(24 * 3600));
    let dir = tempfile::tempdir()?;
    let config = gateway_config(&emu, &dir.path().join("queue"), 1.0, 1000)?;

    // tsgw, QoS 0.
    let gateway = start_gateway(&binary, &config, dir.path())?;
    let idle_kib = rss_kib(gateway.pid())?;
    let watch = Watch::start(gateway.pid())?;
    let started = Instant::now();
    let broker = gateway.mqtt;
    let publishers = tokio::task::spawn_blocking(move || {
        qos0_burst(broker, TOPIC, args.clients, per_client, PHASE_LIMIT)
    });
    let mut last_scrape = Instant::now() - Duration::from_secs(1);
    let mut accepted = 0.0;
    let mut counted_drops = 0.0;
    while accepted + counted_drops < total as f64 {
        if started.elapsed() > PHASE_LIMIT {
            bail!("tsgw accepted {accepted} of {total} within {PHASE_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        if last_scrape.elapsed() >= Duration::from_millis(20) {
            last_scrape = Instant::now();
            let text = gateway.metrics().await?;
            accepted = metric_sum(&text, "tsgw_readings_total", &["result=\"accepted\""]);
            counted_drops = metric_sum(&text, "tsgw_parse_errors_total", &[])
                + metric_sum(&text, "tsgw_mqtt_denied_total", &[]);
        }
    }
    let tsgw_secs = started.elapsed().as_secs_f64();
    eprintln!("tsgw: {total} publishes accounted for in {tsgw_secs:.1} s");
    publishers.await??;
    let (tsgw_peak, tsgw_cpu) = watch.finish()?;
    let text = gateway.metrics().await?;
    let queue_drops = metric_sum(&text, "tsgw_queue_dropped_total", &[]);
    let waits = metric_sum(&text, "tsgw_ingest_backpressure_total", &[]);
    gateway.kill();

    // tsgw, QoS 1 with acks after fsync.
    let qos1_dir = tempfile::tempdir()?;
    let qos1_config = gateway_config(&emu, &qos1_dir.path().join("queue"), 1.0, 1000)?;
    let gateway = start_gateway(&binary, &qos1_config, qos1_dir.path())?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let devices: Vec<_> = (0..args.qos1_devices)
        .map(|d| {
            let (broker, stop, acked) = (gateway.mqtt, stop.clone(), acked.clone());
            let in_flight = args.qos1_in_flight;
            std::thread::spawn(move || {
                qos1_device(broker, format!("qos1-{d}"), in_flight, stop, acked)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await; // warm-up
    let watch = Watch::start(gateway.pid())?;
    let (acked_before, commits_before) = (
        acked.load(Ordering::Relaxed),
        metric_sum(
            &gateway.metrics().await?,
            "tsgw_queue_group_commits_total",
            &[],
        ),
    );
    tokio::time::sleep(Duration::from_secs(args.qos1_seconds)).await;
    let acked_in_window = acked.load(Ordering::Relaxed) - acked_before;
    let commits = metric_sum(
        &gateway.metrics().await?,
        "tsgw_queue_group_commits_total",
        &[],
    ) - commits_before;
    let (qos1_peak, qos1_cpu) = watch.finish()?;
    stop.store(true, Ordering::Relaxed);
    gateway.kill();
    for d in devices {
        // The kill ends each device with a read error; only earlier errors matter.
        let _ = d.join();
    }
    let qos1_rate = acked_in_window as f64 / args.qos1_seconds as f64;
    eprintln!("tsgw QoS 1: {qos1_rate:.0} acked readings/s");

    // mosquitto relaying the same burst to one subscriber.
    let mosquitto = if args.mosquitto.exists() {
        let broker = Mosquitto::start(&args.mosquitto)?;
        let received = Arc::new(AtomicU64::new(0));
        counting_subscriber(broker.addr, received.clone())?;
        let pid = broker.child.id();
        let watch = Watch::start(pid)?;
        let started = Instant::now();
        let addr = broker.addr;
        let publishers = tokio::task::spawn_blocking(move || {
            qos0_burst(addr, TOPIC, args.clients, per_client, PHASE_LIMIT)
        });
        // Until every message is relayed, or nothing more came for 3 s.
        let (mut last, mut last_change) = (0, Instant::now());
        let mut secs = 0.0;
        while last_change.elapsed() < Duration::from_secs(3) && started.elapsed() < PHASE_LIMIT {
            let now = received.load(Ordering::Relaxed);
            if now != last {
                (last, last_change) = (now, Instant::now());
                secs = started.elapsed().as_secs_f64();
            }
            if now >= total as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        publishers.await??;
        let (peak, cpu) = watch.finish()?;
        eprintln!("mosquitto: relayed {last} of {total} in {secs:.1} s");
        Some(Relay {
            secs,
            peak_kib: peak,
            cpu,
            received: last,
        })
    } else {
        None
    };

    let mut table = Table::new(&["figure", "tsgw", "mosquitto 2.0 (relay to one subscriber)"]);
    let m = |f: &dyn Fn(&Relay) -> String| {
        mosquitto
            .as_ref()
            .map(f)
            .unwrap_or_else(|| "not run".into())
    };
    table.row(vec![
        format!(
            "QoS 0 burst, {total} publishes from {} client(s): rate",
            args.clients
        ),
        format!("{:.0} readings/s into the queue", total as f64 / tsgw_secs),
        m(&|r| format!("{:.0} messages/s relayed", total as f64 / r.secs)),
    ]);
    table.row(vec![
        "accounted for".into(),
        format!(
            "{accepted} accepted + {counted_drops} refused (counted) + {queue_drops} dropped by the queue (counted) of {total}"
        ),
        m(&|r| format!("{} of {total} relayed", r.received)),
    ]);
    table.row(vec![
        "peak RSS during the burst".into(),
        format!(
            "{:.1} MiB (idle before: {:.1} MiB)",
            mib(tsgw_peak),
            mib(idle_kib)
        ),
        m(&|r| format!("{:.1} MiB", mib(r.peak_kib))),
    ]);
    table.row(vec![
        "CPU per message".into(),
        format!("{:.1} µs", tsgw_cpu * 1e6 / total as f64),
        m(&|r| format!("{:.1} µs", r.cpu * 1e6 / total as f64)),
    ]);
    table.row(vec![
        "times the front waited for the queue writer".into(),
        format!("{waits}"),
        "-".into(),
    ]);
    table.row(vec![
        format!(
            "QoS 1, {} devices × {} in flight, acks after fsync",
            args.qos1_devices, args.qos1_in_flight
        ),
        format!(
            "{qos1_rate:.0} readings/s acked; {:.1} fsyncs/s (group commit: {:.0} acks per fsync); peak RSS {:.1} MiB; {:.1} µs CPU per reading",
            commits / args.qos1_seconds as f64,
            acked_in_window as f64 / commits.max(1.0),
            mib(qos1_peak),
            qos1_cpu * 1e6 / acked_in_window.max(1) as f64
        ),
        "-".into(),
    ]);
    Ok(format!(
        "### burst ({} build of {})\n\n{}\n\n{}\n",
        if binary.to_string_lossy().contains("release") {
            "release"
        } else {
            "debug"
        },
        binary.display(),
        harness::machine_summary(),
        table.render()
    ))
}
