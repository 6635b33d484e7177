//! `tsgw-bench outage`: a long upstream outage under steady QoS 1 load must
//! lose nothing, and the backlog must drain within ThingSpeak's rate limits.
//!
//! Design:
//! - The outage is a network cut, not an emulator fault: a TCP relay inside
//!   the bench sits between the gateway and BOTH emulator listeners it uses
//!   (MQTT over TLS, and HTTPS for the REST bulk-write backfill — cutting only
//!   MQTT would let the backfill path run through the "outage"). While the
//!   link is down the relay resets every live connection and every new one
//!   (`--cut reset`), or relays nothing and answers nothing (`--cut
//!   blackhole`, a silently dead route). TLS still verifies end to end: the
//!   gateway dials 127.0.0.1, which the emulator's certificate covers.
//! - The forwarder sends one update per channel per window (by measurement
//!   time), so single readings cannot be traced through it; the aggregation
//!   policies are chosen so that every reading leaves a trace. Each device
//!   message is a JSON reading stamped with its send time (`/ts`, so the bench
//!   knows its window exactly) holding `c` and `one` (both 1) and `n` (a
//!   per-channel sequence number); field1 = count of `c`, field2 = sum of
//!   `one`, field3 = sum of `n`. Per channel, the sums over all entries must
//!   equal what the devices got PUBACKs for; per window, each entry must equal
//!   the readings measured in it.
//! - Devices keep publishing before, during and after the outage, one QoS 1
//!   message in flight each, paced at `--rate`.
//! - "Drained": every reading measured before the link came back is counted
//!   in an entry at the emulator. The emulator's rate-limit, duplicate and
//!   refusal counters must stay 0 throughout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use thingspeak_emulator::{EmulatorHandle, WriteOrigin};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use tsgw_testkit::{
    channel, emulator_builder, metric_sum, write_key, AckedDevice, Gateway, GatewayConfig, Rest,
    CHANNELS,
};

use crate::harness::{self, bench_profile, WAIT};
use crate::stats::Table;

/// ThingSpeak's minimum time between bulk calls of a channel.
const BULK_INTERVAL_SECS: u64 = 15;

#[derive(clap::Args, Debug, Clone)]
pub struct OutageArgs {
    /// How long the link to ThingSpeak (MQTT and REST) is cut, seconds.
    #[arg(long, default_value_t = 600)]
    pub outage_secs: u64,
    /// Load before the cut, seconds (the link is up and updates flow).
    #[arg(long, default_value_t = 30)]
    pub before_secs: u64,
    /// Load after the link is back, seconds (counted from the restore; the
    /// load goes on at least until the backlog drained).
    #[arg(long, default_value_t = 60)]
    pub after_secs: u64,
    /// Devices: QoS 1 publishers, one message in flight each, taking turns
    /// over the three channels.
    #[arg(long, default_value_t = 6)]
    pub devices: usize,
    /// Messages per second per device (each message is 3 readings).
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Longest wait from the restore until everything measured before it is
    /// at the emulator, seconds.
    #[arg(long, default_value_t = 300)]
    pub drain_timeout_secs: u64,
    /// Rate limit of emulator and gateway (window length), whole seconds:
    /// ThingSpeak's paid licence 1, free 15.
    #[arg(long, default_value_t = 1)]
    pub interval: u64,
    /// The gateway's `upstream.bulk_max_updates` (ThingSpeak's free licence
    /// and the emulator: 960). Smaller values force more bulk calls.
    #[arg(long, default_value_t = 960)]
    pub bulk_max_updates: usize,
    /// The gateway's `upstream.reconnect_max_secs` (its default: 60).
    #[arg(long, default_value_t = 60.0)]
    pub reconnect_max_secs: f64,
    /// How the link fails.
    #[arg(long, value_enum, default_value_t = Cut::Reset)]
    pub cut: Cut,
    /// Also write the gateway's log (JSON lines) to this file at the end.
    #[arg(long)]
    pub gateway_log: Option<PathBuf>,
}

/// What the relay does with connections while the link is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Cut {
    /// Live connections get a TCP reset; new ones are reset right after accept.
    Reset,
    /// Nothing is relayed and nothing answered: live connections go silent,
    /// new ones never get past the handshake. All are reset when the link
    /// comes back (what a peer that gave up meanwhile would answer).
    Blackhole,
}

impl Cut {
    fn as_str(self) -> &'static str {
        match self {
            Cut::Reset => "reset",
            Cut::Blackhole => "blackhole",
        }
    }
}

// ---- the link: a TCP relay that can be cut ----------------------------------

#[derive(Default)]
struct LinkStats {
    /// Connections relayed to the emulator.
    relayed: AtomicU64,
    /// Connections that arrived while the link was down.
    refused: AtomicU64,
    /// Live connections the cut ended.
    cut: AtomicU64,
}

/// A TCP relay on 127.0.0.1 in front of one emulator listener.
struct Link {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    stats: Arc<LinkStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    async fn start(target: SocketAddr, cut: Cut) -> Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the relay")?;
        let addr = listener.local_addr()?;
        let (up, rx) = watch::channel(true);
        let stats = Arc::new(LinkStats::default());
        let counters = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut rx = rx.clone();
                let counters = counters.clone();
                if !*rx.borrow() {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    match cut {
                        Cut::Reset => reset(inbound),
                        Cut::Blackhole => {
                            tokio::spawn(async move {
                                let _ = rx.wait_for(|up| *up).await;
                                reset(inbound);
                            });
                        }
                    }
                    continue;
                }
                tokio::spawn(relay(inbound, target, rx, cut, counters));
            }
        });
        Ok(Link {
            addr,
            up,
            stats,
            task,
        })
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Closes with RST (SO_LINGER 0): an abrupt end, no orderly FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn relay(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut rx: watch::Receiver<bool>,
    cut: Cut,
    stats: Arc<LinkStats>,
) {
    let outbound = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await;
    let Ok(Ok(mut outbound)) = outbound else {
        reset(inbound);
        return;
    };
    stats.relayed.fetch_add(1, Ordering::Relaxed);
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let was_cut = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
        _ = rx.wait_for(|up| !*up) => true,
    };
    if !was_cut {
        return;
    }
    stats.cut.fetch_add(1, Ordering::Relaxed);
    if cut == Cut::Blackhole {
        let _ = rx.wait_for(|up| *up).await;
    }
    reset(inbound);
    reset(outbound);
}

// ---- load and the ledger of what was acknowledged ---------------------------

/// What the readings of one window add up to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    /// Messages (field1 = count, field2 = sum of ones).
    count: u64,
    /// Sum of their sequence numbers (field3).
    seq_sum: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.count += other.count;
        self.seq_sum += other.seq_sum;
    }
}

/// (channel, window start in Unix seconds).
type WindowKey = (u64, i64);

#[derive(Default)]
struct Ledger {
    next_seq: BTreeMap<u64, u64>,
    published: u64,
    acked: u64,
    /// Acked messages by the window their `/ts` falls in.
    windows: BTreeMap<WindowKey, Tally>,
    errors: Vec<String>,
}

impl Ledger {
    fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
        ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acked messages of `channel` measured before `before` (Unix seconds).
    fn before(&self, channel: u64, before: i64) -> Tally {
        let mut t = Tally::default();
        for (_, w) in self.windows.range((channel, i64::MIN)..(channel, before)) {
            t.add(*w);
        }
        t
    }
}

/// Start (Unix seconds) of the window of `len_secs` holding `ts_ms`, as the
/// forwarder computes it: windows are aligned to Unix time.
fn window_of(ts_ms: i64, len_secs: u64) -> i64 {
    let len_ms = (len_secs * 1000) as i64;
    ts_ms.div_euclid(len_ms) * len_ms / 1000
}

struct LoadDevice {
    /// Owns the device: when it ends, the device's event loop ends with it.
    task: tokio::task::JoinHandle<()>,
}

impl LoadDevice {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        broker: SocketAddr,
        index: usize,
        devices: usize,
        rate: f64,
        interval: u64,
        start: Instant,
        ledger: Arc<Mutex<Ledger>>,
        stop: Arc<AtomicBool>,
    ) -> Result<LoadDevice> {
        let id = format!("outage-dev-{index}");
        let mut device = AckedDevice::connect(broker, &id).await?;
        let task = tokio::spawn(async move {
            // Devices are staggered within a period so they do not publish in step.
            let phase = index as f64 / devices as f64;
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_secs_f64((i as f64 + phase) / rate);
                tokio::time::sleep_until(due.into()).await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let ch = CHANNELS[(index + i as usize) % CHANNELS.len()];
                let seq = {
                    let mut l = Ledger::lock(&ledger);
                    let next = l.next_seq.entry(ch).or_insert(1);
                    let seq = *next;
                    *next += 1;
                    l.published += 1;
                    seq
                };
                let ts = Utc::now().timestamp_millis();
                let payload = format!(r#"{{"ts":{ts},"c":1,"one":1,"n":{seq}}}"#);
                let topic = format!("outage/{ch}/{id}");
                let outcome = async {
                    device.publish(&topic, i, payload).await?;
                    device.next_ack(WAIT).await
                }
                .await;
                let mut l = Ledger::lock(&ledger);
                match outcome {
                    Ok(_) => {
                        l.acked += 1;
                        l.windows
                            .entry((ch, window_of(ts, interval)))
                            .or_default()
                            .add(Tally {
                                count: 1,
                                seq_sum: seq,
                            });
                    }
                    Err(e) => {
                        l.errors
                            .push(format!("device {id}, message {i} (channel {ch}): {e}"));
                        return;
                    }
                }
                i += 1;
            }
        });
        Ok(LoadDevice { task })
    }

    /// Lets the message in flight finish (its PUBACK) and stops.
    async fn stop(mut self) {
        if tokio::time::timeout(WAIT, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

// ---- what reached the emulator ----------------------------------------------

/// One entry as the bench reads it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    /// created_at, Unix seconds.
    at: i64,
    count: Option<u64>,
    ones: Option<u64>,
    seq_sum: Option<u64>,
}

fn whole(v: Option<&str>) -> Option<u64> {
    let f: f64 = v?.trim().parse().ok()?;
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0).then_some(f as u64)
}

fn seen(emu: &EmulatorHandle, ch: u64) -> Vec<Seen> {
    emu.entries(channel(ch))
        .iter()
        .map(|e| Seen {
            at: e.created_at().timestamp(),
            count: whole(e.field(1)),
            ones: whole(e.field(2)),
            seq_sum: whole(e.field(3)),
        })
        .collect()
}

/// Messages of `ch` counted in entries stamped before `before`.
fn counted_before(entries: &[Seen], before: i64) -> u64 {
    entries
        .iter()
        .filter(|e| e.at < before)
        .filter_map(|e| e.count)
        .sum()
}

/// One channel's entries judged against the ledger.
#[derive(Debug, Default, PartialEq)]
struct ChannelVerdict {
    expected: Tally,
    accounted: Tally,
    windows_with_readings: u64,
    entries: u64,
    exact: u64,
    /// Windows with acked readings and no entry.
    missing: u64,
    /// Windows whose entry differs from the readings measured in them.
    differing: u64,
    /// Most readings ever counted in a later window than they were measured
    /// in (the forwarder puts a reading that reaches the queue after its
    /// window was sent into the next window still open).
    max_moved_later: u64,
    /// Problems that are failures whatever the totals say.
    faults: Vec<String>,
}

/// Compares per window. `strict` is the range of window starts in which
/// nothing was delivered before the window closed (inside the outage), so no
/// reading can have moved to a later window there: every window must match.
fn judge_channel(
    ch: u64,
    ledger: &BTreeMap<i64, Tally>,
    entries: &[Seen],
    strict: (i64, i64),
) -> ChannelVerdict {
    let mut v = ChannelVerdict::default();
    let mut by_window: BTreeMap<i64, Tally> = BTreeMap::new();
    for e in entries {
        v.entries += 1;
        let (Some(count), Some(ones), Some(seq_sum)) = (e.count, e.ones, e.seq_sum) else {
            v.faults.push(format!(
                "channel {ch}: entry at {} lacks a whole field1/2/3: {e:?}",
                e.at
            ));
            continue;
        };
        if count != ones {
            v.faults.push(format!(
                "channel {ch}: entry at {}: count {count} but sum of ones {ones}",
                e.at
            ));
        }
        if by_window.insert(e.at, Tally { count, seq_sum }).is_some() {
            v.faults.push(format!(
                "channel {ch}: two entries with created_at {}",
                e.at
            ));
        }
        v.accounted.add(Tally { count, seq_sum });
    }
    let mut windows: Vec<i64> = ledger.keys().chain(by_window.keys()).copied().collect();
    windows.sort_unstable();
    windows.dedup();
    // Readings measured so far minus readings counted so far, in window order.
    let mut backlog: i64 = 0;
    for w in windows {
        let want = ledger.get(&w).copied().unwrap_or_default();
        let got = by_window.get(&w).copied();
        v.expected.add(want);
        if want.count > 0 {
            v.windows_with_readings += 1;
        }
        match got {
            Some(g) if g == want => v.exact += 1,
            None if want.count > 0 => v.missing += 1,
            None => {}
            Some(_) => v.differing += 1,
        }
        let inside = w >= strict.0 && w < strict.1;
        if inside && got.unwrap_or_default() != want {
            v.faults.push(format!(
                "channel {ch}: window {w} (inside the outage) holds {got:?}, readings measured in it: {want:?}"
            ));
        }
        backlog += want.count as i64 - got.map_or(0, |g| g.count) as i64;
        if backlog < 0 {
            v.faults.push(format!(
                "channel {ch}: by window {w}, {} more readings counted than measured",
                -backlog
            ));
            backlog = 0;
        }
        v.max_moved_later = v.max_moved_later.max(backlog as u64);
    }
    v
}

// ---- the run -----------------------------------------------------------------

/// Where a window falls on the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Before,
    Outage,
    After,
}

/// Figures sampled while the harness runs.
#[derive(Default)]
struct Watch {
    peak_queue: f64,
    peak_rss_kib: u64,
}

async fn sample(
    gateway: &mut Gateway,
    ledger: &Mutex<Ledger>,
    watch: &mut Watch,
) -> Result<String> {
    if let Ok(Some(status)) = gateway.child.try_wait() {
        bail!("tsgw exited ({status}); log:\n{}", gateway.log_text());
    }
    if let Some(e) = Ledger::lock(ledger).errors.first() {
        bail!("a device failed: {e}");
    }
    let text = gateway.metrics().await?;
    let queued = metric_sum(&text, "tsgw_queue_readings", &[]);
    watch.peak_queue = watch.peak_queue.max(queued);
    watch.peak_rss_kib = watch
        .peak_rss_kib
        .max(harness::rss_kib(gateway.pid()).unwrap_or(0));
    let l = Ledger::lock(ledger);
    Ok(format!(
        "acked {}/{} msgs, queue {queued:.0} readings (oldest {:.0} s), upstream connected {:.0}",
        l.acked,
        l.published,
        metric_sum(&text, "tsgw_queue_oldest_age_seconds", &[]),
        metric_sum(&text, "tsgw_upstream_connected", &[]),
    ))
}

/// Sleeps `secs` while reporting progress and failing fast on a dead gateway
/// or device.
async fn phase(
    name: &str,
    secs: u64,
    started: Instant,
    gateway: &mut Gateway,
    ledger: &Mutex<Ledger>,
    watch: &mut Watch,
) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    let every = Duration::from_secs(if secs > 120 { 30 } else { 10 });
    loop {
        let line = sample(gateway, ledger, watch).await?;
        eprintln!(
            "[{:>5.0} s] {name}: {line}",
            started.elapsed().as_secs_f64()
        );
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        tokio::time::sleep(every.min(end - now)).await;
    }
}

pub async fn run(args: OutageArgs, binary: PathBuf) -> Result<String> {
    if args.interval == 0
        || args.devices == 0
        || !args.rate.is_finite()
        || args.rate <= 0.0
        || args.outage_secs == 0
    {
        bail!("--interval, --devices, --rate and --outage-secs must be positive");
    }
    let started = Instant::now();
    let machine_before = harness::machine_summary();
    tsgw_testkit::crypto();
    let interval = Duration::from_secs(args.interval);
    let emu = emulator_builder(interval)
        .tls("127.0.0.1:0")
        .https("127.0.0.1:0")
        .bulk_interval(Duration::from_secs(BULK_INTERVAL_SECS))
        .start()
        .await
        .map_err(|e| anyhow!("emulator does not start: {e}"))?;
    let mqtt_link = Link::start(emu.tls_addr().context("no TLS listener")?, args.cut).await?;
    let rest_link = Link::start(emu.https_addr().context("no HTTPS listener")?, args.cut).await?;

    let dir = tempfile::tempdir()?;
    let ca = emu.ca_file().context("emulator has no CA file")?;
    let upstream_extra = format!(
        r#"rest_host = "127.0.0.1"
rest_port = {rest_port}
bulk_interval_secs = {BULK_INTERVAL_SECS}.0
bulk_max_updates = {bulk_max}
backfill = "bulk"
aggregate = {{ field1 = "count", field2 = "sum", field3 = "sum" }}"#,
        rest_port = rest_link.addr.port(),
        bulk_max = args.bulk_max_updates,
    );
    let mut extra = String::new();
    for id in CHANNELS {
        extra.push_str(&format!(
            r#"
[upstream.channels."{id}"]
write_key = "{key}"

[[mqtt.rules]]
name = "outage-{id}"
topic = "outage/{id}/+"
channel = {id}
parser = {{ format = "json", fields = {{ "/c" = "field1", "/one" = "field2", "/n" = "field3" }}, time_pointer = "/ts" }}
"#,
            key = write_key(id),
        ));
    }
    let mut config = bench_profile(
        GatewayConfig::to_upstream(mqtt_link.addr.port(), ca, &dir.path().join("queue")),
        args.interval as f64,
        1000,
    );
    config.reconnect_secs = (1.0, args.reconnect_max_secs);
    config.rest = Rest::Custom;
    config.upstream_extra = upstream_extra;
    config.extra.push_str(&extra);
    let mut gateway = harness::start_gateway(&binary, &config, dir.path())?;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load_start = Instant::now();
    let mut devices = Vec::new();
    for d in 0..args.devices {
        devices.push(
            LoadDevice::start(
                gateway.mqtt,
                d,
                args.devices,
                args.rate,
                args.interval,
                load_start,
                ledger.clone(),
                stop.clone(),
            )
            .await?,
        );
    }
    let mut watch = Watch::default();

    // Before: updates must be flowing, or the cut proves nothing.
    phase(
        "before the cut",
        args.before_secs,
        started,
        &mut gateway,
        &ledger,
        &mut watch,
    )
    .await?;
    let deadline = Instant::now() + WAIT;
    while CHANNELS.iter().any(|&c| emu.entries(channel(c)).is_empty()) {
        if Instant::now() > deadline {
            bail!(
                "no entries at the emulator before the cut; gateway log:\n{}",
                gateway.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The outage.
    mqtt_link.set_up(false);
    rest_link.set_up(false);
    let down_at = Utc::now();
    eprintln!(
        "[{:>5.0} s] link cut ({}) for {} s",
        started.elapsed().as_secs_f64(),
        args.cut.as_str(),
        args.outage_secs
    );
    // An update written just before the cut may still land; after this
    // settling time nothing may reach the emulator until the restore.
    let settle = 5.min(args.outage_secs);
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let entries_at_cut = total_entries(&emu);
    phase(
        "outage",
        args.outage_secs - settle,
        started,
        &mut gateway,
        &ledger,
        &mut watch,
    )
    .await?;
    let entries_during_outage = total_entries(&emu) - entries_at_cut;
    let text = gateway.metrics().await?;
    let backlog_readings = metric_sum(&text, "tsgw_queue_readings", &[]);
    let backlog_age = metric_sum(&text, "tsgw_queue_oldest_age_seconds", &[]);
    let counters_at_restore = emu.counters();

    // The restore, and the drain of everything measured before it.
    mqtt_link.set_up(true);
    rest_link.set_up(true);
    let up_at = Utc::now();
    let restored = Instant::now();
    eprintln!(
        "[{:>5.0} s] link restored; backlog {backlog_readings:.0} readings, oldest {backlog_age:.0} s",
        started.elapsed().as_secs_f64()
    );
    let up_window = window_of(up_at.timestamp_millis(), args.interval);
    let drain_deadline = restored + Duration::from_secs(args.drain_timeout_secs);
    let mut first_bulk: Option<Duration> = None;
    let mut drained: Option<Duration> = None;
    let mut last_report = Instant::now();
    while drained.is_none() && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let line = sample(&mut gateway, &ledger, &mut watch).await?;
        if first_bulk.is_none() && emu.counters().bulk_calls > counters_at_restore.bulk_calls {
            first_bulk = Some(restored.elapsed());
        }
        let done = {
            let l = Ledger::lock(&ledger);
            CHANNELS
                .iter()
                .all(|&c| counted_before(&seen(&emu, c), up_window) >= l.before(c, up_window).count)
        };
        if done {
            drained = Some(restored.elapsed());
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "[{:>5.0} s] draining: {line}, {} bulk calls",
                started.elapsed().as_secs_f64(),
                emu.counters().bulk_calls
            );
        }
    }
    eprintln!(
        "[{:>5.0} s] backlog {}",
        started.elapsed().as_secs_f64(),
        match drained {
            Some(d) => format!("drained {:.1} s after the restore", d.as_secs_f64()),
            None => format!("NOT drained within {} s", args.drain_timeout_secs),
        }
    );
    let after_left = Duration::from_secs(args.after_secs).saturating_sub(restored.elapsed());
    phase(
        "after the restore",
        after_left.as_secs(),
        started,
        &mut gateway,
        &ledger,
        &mut watch,
    )
    .await?;

    // Stop the load; everything acked must leave the queue.
    stop.store(true, Ordering::Relaxed);
    for d in devices {
        d.stop().await;
    }
    let final_wait = WAIT + interval * 4;
    let deadline = Instant::now() + final_wait;
    let mut emptied = false;
    while Instant::now() < deadline {
        let text = gateway.metrics().await?;
        if metric_sum(&text, "tsgw_queue_readings", &[]) == 0.0 {
            emptied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let metrics = gateway.metrics().await?;
    let machine_after = harness::machine_summary();
    let logs = gateway.logs();
    // The log's own timestamps: polling /metrics would blur this to the
    // progress interval once the drain is over.
    let reconnected = logs
        .iter()
        .filter(|l| l["fields"]["message"] == "connected to ThingSpeak")
        .filter_map(|l| l["timestamp"].as_str()?.parse::<DateTime<Utc>>().ok())
        .find(|t| *t >= up_at)
        .and_then(|t| (t - up_at).to_std().ok());
    let failed_bulk_calls = logs
        .iter()
        .filter(|l| l["fields"]["message"] == "bulk call failed; retrying later")
        .count();
    if let Some(path) = &args.gateway_log {
        let text: String = logs.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }

    // Judge.
    let l = Ledger::lock(&ledger);
    let strict = (
        window_of(down_at.timestamp_millis(), args.interval) + args.interval as i64,
        up_window,
    );
    let mut verdicts = Vec::new();
    // (phase, origin) → entries: which path each part of the timeline took.
    let mut origins: BTreeMap<(Phase, &str), u64> = BTreeMap::new();
    for c in CHANNELS {
        let own: BTreeMap<i64, Tally> = l
            .windows
            .range((c, i64::MIN)..=(c, i64::MAX))
            .map(|(&(_, w), &t)| (w, t))
            .collect();
        verdicts.push(judge_channel(c, &own, &seen(&emu, c), strict));
        for e in emu.entries(channel(c)) {
            let origin = match e.origin {
                WriteOrigin::Mqtt => "mqtt",
                WriteOrigin::Bulk => "bulk",
                WriteOrigin::UpdateApi => "update_api",
            };
            let at = e.created_at().timestamp();
            let phase = if at < strict.0 - args.interval as i64 {
                Phase::Before
            } else if at < up_window {
                Phase::Outage
            } else {
                Phase::After
            };
            *origins.entry((phase, origin)).or_default() += 1;
        }
    }
    let sum = |f: fn(&ChannelVerdict) -> u64| verdicts.iter().map(f).sum::<u64>();
    let expected = sum(|v| v.expected.count);
    let accounted = sum(|v| v.accounted.count);
    let seq_ok = verdicts
        .iter()
        .all(|v| v.expected.seq_sum == v.accounted.seq_sum);
    let lost = expected.saturating_sub(accounted);
    let extra_counted = accounted.saturating_sub(expected);
    let counters = emu.counters();
    let accepted_readings = metric_sum(&metrics, "tsgw_readings_total", &["result=\"accepted\""]);
    let queue_dropped = metric_sum(&metrics, "tsgw_queue_dropped_total", &[]);
    let updates_dropped = metric_sum(&metrics, "tsgw_updates_dropped_total", &[]);
    let retried = metric_sum(&metrics, "tsgw_updates_retried_total", &[]);
    let disconnects = metric_sum(&metrics, "tsgw_upstream_disconnects_total", &[]);
    let faults: Vec<String> = verdicts.iter().flat_map(|v| v.faults.clone()).collect();
    let by_origin = |phase: Option<Phase>, origin: &str| -> u64 {
        origins
            .iter()
            .filter(|((p, o), _)| *o == origin && phase.is_none_or(|want| *p == want))
            .map(|(_, n)| n)
            .sum()
    };
    let secs = |d: Option<Duration>| {
        d.map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "never".into())
    };

    let mut table = Table::new(&["figure", "value"]);
    let rows: Vec<(String, String)> = vec![
        (
            "outage: MQTT/TLS and HTTPS (REST) link cut".into(),
            format!("{} s, `--cut {}`", args.outage_secs, args.cut.as_str()),
        ),
        (
            "load: QoS 1 devices × rate, 3 channels, 3 readings/message".into(),
            format!(
                "{} × {} msg/s, {} s before, {} s during, ≥ {} s after",
                args.devices, args.rate, args.before_secs, args.outage_secs, args.after_secs
            ),
        ),
        (
            "rate limit (window) / bulk interval / bulk max".into(),
            format!(
                "{} s / {BULK_INTERVAL_SECS} s / {}",
                args.interval, args.bulk_max_updates
            ),
        ),
        (
            "messages published / acked (PUBACK)".into(),
            format!("{} / {}", l.published, l.acked),
        ),
        (
            "readings accepted by the gateway".into(),
            format!("{accepted_readings:.0} ({:.0} messages)", accepted_readings / 3.0),
        ),
        (
            "backlog at the restore (queued readings, oldest)".into(),
            format!("{backlog_readings:.0}, {backlog_age:.0} s"),
        ),
        (
            "entries stored while the link was down".into(),
            entries_during_outage.to_string(),
        ),
        (
            "bulk calls that failed on the cut link (retried every bulk interval)".into(),
            failed_bulk_calls.to_string(),
        ),
        ("restore → MQTT reconnected (backoff)".into(), secs(reconnected)),
        ("restore → first bulk call".into(), secs(first_bulk)),
        (
            "restore → backlog drained (all measured before the restore at the emulator)"
                .into(),
            format!("**{}**", secs(drained)),
        ),
        (
            "entries: total / by MQTT / by bulk".into(),
            format!(
                "{} / {} / {}",
                sum(|v| v.entries),
                by_origin(None, "mqtt"),
                by_origin(None, "bulk")
            ),
        ),
        (
            "entries by MQTT / bulk for windows before the cut, in the outage, after the restore"
                .into(),
            [Phase::Before, Phase::Outage, Phase::After]
                .map(|p| {
                    format!(
                        "{} / {}",
                        by_origin(Some(p), "mqtt"),
                        by_origin(Some(p), "bulk")
                    )
                })
                .join(", "),
        ),
        (
            "bulk calls / entries / rejected".into(),
            format!(
                "{} / {} / {}",
                counters.bulk_calls, counters.bulk_entries, counters.bulk_rejected
            ),
        ),
        (
            "messages accounted for at the emulator (Σ field1 = count)".into(),
            format!("{accounted} of {expected} acked"),
        ),
        ("messages lost".into(), format!("**{lost}**")),
        ("messages counted twice / never sent".into(), extra_counted.to_string()),
        (
            "sequence-number sums equal per channel".into(),
            if seq_ok { "yes".into() } else { "**no**".into() },
        ),
        (
            "windows with readings / exact / missing / differing".into(),
            format!(
                "{} / {} / {} / {}",
                sum(|v| v.windows_with_readings),
                sum(|v| v.exact),
                sum(|v| v.missing),
                sum(|v| v.differing)
            ),
        ),
        (
            "most readings moved to a later window (arrived after theirs was sent)".into(),
            verdicts
                .iter()
                .map(|v| v.max_moved_later)
                .max()
                .unwrap_or(0)
                .to_string(),
        ),
        (
            "emulator: dropped_rate_limit / rejected_duplicate_timestamp / bulk_rejected / update_rejected"
                .into(),
            format!(
                "{} / {} / {} / {}",
                counters.dropped_rate_limit,
                counters.rejected_duplicate_timestamp,
                counters.bulk_rejected,
                counters.update_rejected
            ),
        ),
        (
            "gateway: updates retried / updates dropped / queue dropped".into(),
            format!("{retried:.0} / {updates_dropped:.0} / {queue_dropped:.0}"),
        ),
        (
            "gateway: upstream disconnects; relay: connections refused / cut".into(),
            format!(
                "{disconnects:.0}; {} / {}",
                mqtt_link.stats.refused.load(Ordering::Relaxed)
                    + rest_link.stats.refused.load(Ordering::Relaxed),
                mqtt_link.stats.cut.load(Ordering::Relaxed)
                    + rest_link.stats.cut.load(Ordering::Relaxed)
            ),
        ),
        (
            "gateway: peak queue / peak RSS".into(),
            format!(
                "{:.0} readings / {:.1} MiB",
                watch.peak_queue,
                harness::mib(watch.peak_rss_kib)
            ),
        ),
        (
            "wall time".into(),
            format!("{:.0} s", started.elapsed().as_secs_f64()),
        ),
    ];
    for (k, v) in rows {
        table.row(vec![k, v]);
    }
    let mut report = format!(
        "### outage ({} s, --cut {})\n\n{machine_before}\n{machine_after}\n\n{}\n",
        args.outage_secs,
        args.cut.as_str(),
        table.render()
    );

    let mut failures = Vec::new();
    if lost > 0 || extra_counted > 0 || !seq_ok {
        failures.push(format!(
            "{lost} acked messages lost, {extra_counted} counted in excess, sequence sums equal: {seq_ok}"
        ));
    }
    if !faults.is_empty() {
        failures.push(format!("{} per-window faults", faults.len()));
    }
    if counters.dropped_rate_limit > 0
        || counters.rejected_duplicate_timestamp > 0
        || counters.bulk_rejected > 0
        || counters.update_rejected > 0
    {
        failures.push(format!(
            "the emulator refused or dropped writes: {counters:?}"
        ));
    }
    if queue_dropped > 0.0 || updates_dropped > 0.0 {
        failures.push(format!(
            "the gateway dropped {queue_dropped} readings and {updates_dropped} updates"
        ));
    }
    if entries_during_outage > 0 {
        failures.push(format!(
            "{entries_during_outage} entries arrived while the link was cut: the cut is not real"
        ));
    }
    if drained.is_none() {
        failures.push(format!(
            "the backlog did not drain within {} s",
            args.drain_timeout_secs
        ));
    }
    if !emptied {
        failures.push(format!(
            "the queue did not empty within {final_wait:?} after the load stopped"
        ));
    }
    if l.published != l.acked || !l.errors.is_empty() {
        failures.push(format!(
            "{} messages published but not acked; device errors: {:?}",
            l.published - l.acked,
            l.errors
        ));
    }
    for line in faults.iter().take(20) {
        report.push_str(&format!("\n- {line}"));
    }
    if !failures.is_empty() {
        eprintln!("{report}\ngateway log (tail):\n{}", gateway.log_text());
        bail!("outage: {}", failures.join("; "));
    }
    Ok(report)
}

fn total_entries(emu: &EmulatorHandle) -> u64 {
    CHANNELS
        .iter()
        .map(|&c| emu.entries(channel(c)).len() as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(count: u64, seq_sum: u64) -> Tally {
        Tally { count, seq_sum }
    }

    fn entry(at: i64, t: Tally) -> Seen {
        Seen {
            at,
            count: Some(t.count),
            ones: Some(t.count),
            seq_sum: Some(t.seq_sum),
        }
    }

    fn ledger(items: &[(i64, Tally)]) -> BTreeMap<i64, Tally> {
        items.iter().copied().collect()
    }

    #[test]
    fn windows_are_aligned_to_unix_time() {
        assert_eq!(window_of(1_700_000_000_999, 1), 1_700_000_000);
        assert_eq!(window_of(1_700_000_009_999, 15), 1_699_999_995);
        assert_eq!(window_of(1_700_000_010_000, 15), 1_700_000_010);
    }

    #[test]
    fn matching_windows_pass() {
        let l = ledger(&[(10, tally(2, 3)), (11, tally(1, 3))]);
        let e = [entry(10, tally(2, 3)), entry(11, tally(1, 3))];
        let v = judge_channel(1, &l, &e, (0, 100));
        assert!(v.faults.is_empty(), "{v:?}");
        assert_eq!((v.exact, v.missing, v.differing), (2, 0, 0));
        assert_eq!(v.accounted, v.expected);
    }

    #[test]
    fn a_lost_window_shows_in_totals_and_inside_the_outage() {
        let l = ledger(&[(10, tally(2, 3)), (11, tally(1, 3))]);
        let e = [entry(10, tally(2, 3))];
        let v = judge_channel(1, &l, &e, (11, 12));
        assert_eq!(v.missing, 1);
        assert_eq!(v.accounted.count + 1, v.expected.count);
        assert_eq!(v.faults.len(), 1, "{v:?}");
        assert_eq!(v.max_moved_later, 1);
    }

    #[test]
    fn a_late_reading_moves_forward_without_a_fault_outside_the_outage() {
        // Reading 3 was measured in window 10 but reached the queue after
        // window 10 was sent: it is counted in window 11.
        let l = ledger(&[(10, tally(2, 3)), (11, tally(1, 4))]);
        let e = [entry(10, tally(1, 1)), entry(11, tally(2, 6))];
        let v = judge_channel(1, &l, &e, (50, 60));
        assert!(v.faults.is_empty(), "{v:?}");
        assert_eq!(v.differing, 2);
        assert_eq!(v.max_moved_later, 1);
        assert_eq!(v.accounted, v.expected);
    }

    #[test]
    fn readings_counted_before_they_were_measured_or_twice_are_faults() {
        let l = ledger(&[(10, tally(1, 1))]);
        let e = [entry(9, tally(1, 1)), entry(10, tally(1, 1))];
        let v = judge_channel(1, &l, &e, (50, 60));
        assert!(!v.faults.is_empty(), "{v:?}");
        assert_eq!(v.accounted.count, 2);
        let mut odd = entry(10, tally(2, 3));
        odd.ones = Some(1);
        let v = judge_channel(1, &ledger(&[(10, tally(2, 3))]), &[odd], (50, 60));
        assert_eq!(v.faults.len(), 1, "{v:?}");
    }

    #[test]
    fn fields_parse_as_whole_numbers() {
        assert_eq!(whole(Some("12")), Some(12));
        assert_eq!(whole(Some("12.0")), Some(12));
        assert_eq!(whole(Some("12.5")), None);
        assert_eq!(whole(Some("-1")), None);
        assert_eq!(whole(None), None);
    }

    #[test]
    fn counted_before_sums_older_entries_only() {
        let e = [entry(9, tally(2, 0)), entry(10, tally(5, 0))];
        assert_eq!(counted_before(&e, 10), 2);
        assert_eq!(counted_before(&e, 11), 7);
    }
}
