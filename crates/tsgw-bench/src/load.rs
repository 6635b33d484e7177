//! Local MQTT load: N publishers, flood or paced, with the cumulative "sent"
//! curve sampled every millisecond and the broker side sampled by a probe.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rumqttc::QoS;

use tsgw_testkit::Device;

use crate::harness::{cpu_ticks, rss_kib};
use crate::stats::Curve;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub publishers: usize,
    pub qos: QoS,
    /// Total messages per second across publishers; `None` = as fast as the link takes them.
    pub rate: Option<f64>,
    /// Sent before the measured window starts (fills pipelines, warms caches).
    pub warmup: Duration,
    pub duration: Duration,
    /// `topic(publisher, n)`: where message `n` of a publisher goes.
    pub topic: fn(usize, u64) -> String,
    /// `payload(publisher, n)`.
    pub payload: fn(usize, u64) -> Vec<u8>,
}

/// Reads the broker side's cumulative count of handled messages.
pub type Probe = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Result<f64>> + Send>> + Send + Sync>;

pub struct LoadOutcome {
    /// Cumulative messages written to sockets by all publishers.
    pub sent: Curve,
    /// The probe's cumulative count, minus its value before the load started.
    pub done: Curve,
    /// Start and end of the measured window, seconds since the load started.
    pub window: (f64, f64),
    pub sent_total: u64,
    pub done_total: f64,
    /// Peak RSS of `watch_pid` during the window, KiB.
    pub peak_rss_kib: u64,
    /// CPU of `watch_pid` during the window, share of one core.
    pub cpu_share: f64,
}

impl LoadOutcome {
    pub fn rate_in_window(curve: &[(f64, f64)], window: (f64, f64)) -> f64 {
        let at = |t: f64| {
            let i = curve.partition_point(|&(s, _)| s < t);
            curve
                .get(i.min(curve.len().saturating_sub(1)))
                .map(|&(_, c)| c)
                .unwrap_or(0.0)
        };
        (at(window.1) - at(window.0)) / (window.1 - window.0).max(1e-9)
    }

    pub fn sent_rate(&self) -> f64 {
        Self::rate_in_window(&self.sent, self.window)
    }

    pub fn done_rate(&self) -> f64 {
        Self::rate_in_window(&self.done, self.window)
    }
}

/// Runs `spec` against `broker`, sampling `probe` every `probe_every` until
/// `drain` after the publishers stopped (or until the probe reached what was sent).
pub async fn run(
    broker: SocketAddr,
    spec: &LoadSpec,
    probe: Probe,
    probe_every: Duration,
    drain: Duration,
    watch_pid: Option<u32>,
) -> Result<LoadOutcome> {
    let mut devices = Vec::new();
    for i in 0..spec.publishers {
        devices.push(Arc::new(
            Device::connect(broker, &format!("bench-pub-{i}"), 10_000).await?,
        ));
    }
    let baseline = probe().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let ticks_per_sec = crate::harness::clock_ticks_per_sec();

    let mut publishers = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let dev = dev.clone();
        let stop = stop.clone();
        let spec = spec.clone();
        publishers.push(tokio::spawn(async move {
            let per_publisher = spec.rate.map(|r| r / spec.publishers as f64);
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Some(rate) = per_publisher {
                    let due = (start.elapsed().as_secs_f64() * rate) as u64;
                    if n >= due {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                }
                if dev
                    .publish(&(spec.topic)(i, n), spec.qos, (spec.payload)(i, n))
                    .await
                    .is_err()
                {
                    return;
                }
                n += 1;
                // A flood still yields now and then so the samplers keep time.
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }

    let sent_counters: Vec<Arc<AtomicU64>> = devices.iter().map(|d| d.sent.clone()).collect();
    let sent_total = move || -> u64 {
        sent_counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    };
    let sent_sampler = {
        let stop_sampling = Arc::new(AtomicBool::new(false));
        let flag = stop_sampling.clone();
        let sent_total = sent_total.clone();
        let task = tokio::spawn(async move {
            let mut curve = vec![(0.0, 0.0)];
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                curve.push((start.elapsed().as_secs_f64(), sent_total() as f64));
            }
            curve
        });
        (stop_sampling, task)
    };

    let window = (
        spec.warmup.as_secs_f64(),
        (spec.warmup + spec.duration).as_secs_f64(),
    );
    let mut done: Curve = vec![(0.0, 0.0)];
    let mut peak_rss = 0;
    let mut cpu_at_start = None;
    let mut cpu_at_end = None;
    let load_end = spec.warmup + spec.duration;
    let drain_deadline = load_end + drain;
    let mut tick = tokio::time::interval(probe_every);
    loop {
        tick.tick().await;
        let elapsed = start.elapsed();
        if elapsed >= load_end && !stop.swap(true, Ordering::Relaxed) {
            cpu_at_end = watch_pid.and_then(|p| cpu_ticks(p).ok());
        }
        if let Some(pid) = watch_pid {
            if cpu_at_start.is_none() && elapsed.as_secs_f64() >= window.0 {
                cpu_at_start = cpu_ticks(pid).ok();
            }
            if elapsed < load_end {
                peak_rss = peak_rss.max(rss_kib(pid).unwrap_or(0));
            }
        }
        let value = probe().await? - baseline;
        done.push((start.elapsed().as_secs_f64(), value));
        if elapsed >= load_end {
            let all_in = value >= sent_total() as f64;
            if all_in || elapsed >= drain_deadline {
                break;
            }
        }
    }
    for p in publishers {
        p.abort();
    }
    sent_sampler.0.store(true, Ordering::Relaxed);
    let sent = sent_sampler.1.await?;
    let cpu_share = match (cpu_at_start, cpu_at_end) {
        (Some(a), Some(b)) => (b.saturating_sub(a)) as f64 / ticks_per_sec / (window.1 - window.0),
        _ => 0.0,
    };
    Ok(LoadOutcome {
        sent_total: sent.last().map(|&(_, c)| c as u64).unwrap_or(0),
        done_total: done.last().map(|&(_, c)| c).unwrap_or(0.0),
        sent,
        done,
        window,
        peak_rss_kib: peak_rss,
        cpu_share,
    })
}
