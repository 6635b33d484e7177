//! An update in doubt after a crash is never stored twice and never stalls
//! its channel: the gateway is SIGKILLed right after ThingSpeak (the
//! emulator) stored one of its updates, 20 times, and restarted on the same
//! queue each time, under QoS 1 load of `field1=1` summed per window.
//!
//! Exact accounting: every PUBACK means "on disk" (the queue acks only after
//! fsync). Before each kill the device stops and its last publish is acked,
//! so nothing is in flight: the upstream sums must equal what was acked,
//! exactly. Each publish carries `field1=1` (count) and `field2=<seq>`, a
//! number unique to that publish, both summed per window: a lost window and a
//! duplicated one cannot cancel out in both sums.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::time::Instant;

use crate::common::*;

const KILLS: u32 = 20;
const CH: u64 = 1001;
/// update_interval_secs and the emulator's rate limit.
const INTERVAL: Duration = Duration::from_secs(2);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);
/// The backlog a restart leaves (the first update waits one interval) goes
/// by bulk calls this often, as under the default `backfill = "bulk"`.
const BULK_INTERVAL: Duration = Duration::from_secs(4);
/// Pause between publishes: about 50 a second.
const PACE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Tally {
    acked: AtomicU64,
    /// Sum of the acked publishes' `field2` (their seqs).
    acked_seq_sum: AtomicU64,
    /// Publishes whose PUBACK never came (their connection died first).
    cut_off: AtomicU64,
    /// The last seq handed out; each publish takes the next.
    seq: AtomicU64,
}

/// Publishes `field1=1&field2=<seq>` to the gateway at `broker` one at a
/// time until `stop` or the connection dies; counts PUBACKs (and sums their
/// seqs) and cut-off publishes.
async fn lockstep_device(broker: SocketAddr, id: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let topic = format!("channels/{CH}/publish");
    while !stop.load(Ordering::SeqCst) {
        let seq = tally.seq.fetch_add(1, Ordering::SeqCst) + 1;
        if client
            .publish(
                &topic,
                QoS::AtLeastOnce,
                false,
                format!("field1=1&field2={seq}"),
            )
            .await
            .is_err()
        {
            return;
        }
        let acked = tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if acked == Ok(true) {
            tally.acked.fetch_add(1, Ordering::SeqCst);
            tally.acked_seq_sum.fetch_add(seq, Ordering::SeqCst);
        } else {
            tally.cut_off.fetch_add(1, Ordering::SeqCst);
            return;
        }
        tokio::time::sleep(PACE).await;
    }
}

/// The sum over the channel's stored entries of field `n` (a window's sum).
fn upstream_sum(emulator: &thingspeak_emulator::EmulatorHandle, n: u8) -> u64 {
    entries(emulator, CH)
        .iter()
        .map(|e| {
            let v = e
                .field(n)
                .unwrap_or_else(|| panic!("every entry has field{n}"));
            v.parse::<f64>()
                .unwrap_or_else(|_| panic!("field{n} {v:?} is a sum")) as u64
        })
        .sum()
}

/// Adds one run's `tsgw_updates_in_doubt_total` samples (Prometheus text) to
/// `totals`, by resolution.
fn add_resolutions(family: &str, totals: &mut std::collections::BTreeMap<String, f64>) {
    for line in family.lines().filter(|l| !l.starts_with('#')) {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(resolution) = labels
            .split("resolution=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        *totals.entry(resolution.to_owned()).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
}

/// The test channels and device, with bulk calls allowed every second.
async fn emulator_fast_bulk() -> thingspeak_emulator::EmulatorHandle {
    tsgw_testkit::crypto();
    tsgw_testkit::emulator_builder(INTERVAL)
        .tls("127.0.0.1:0")
        .http("127.0.0.1:0")
        .bulk_interval(BULK_INTERVAL)
        .start()
        .await
        .expect("emulator starts")
}

async fn kill_loop(read_key: bool) {
    let emulator = emulator_fast_bulk().await;
    let key = if read_key {
        format!("read_key = \"READKEY{CH:09}\"")
    } else {
        String::new()
    };
    let extra = format!(
        r#"
[upstream.channels."{CH}"]
aggregate = {{ field1 = "sum", field2 = "sum" }}
write_key = "WRITEKEY{CH:08}"
{key}
"#
    );
    let dir = tempfile::tempdir().unwrap();
    let mut gateway_config = config(&emulator, dir.path(), INTERVAL.as_secs_f64(), &extra);
    // REST calls go to the emulator's HTTP listener (the kit's config does that).
    gateway_config.upstream_extra = format!(
        "confirm_timeout_secs = {:?}\nread_api = true\nbulk_interval_secs = {:?}\n",
        CONFIRM_TIMEOUT.as_secs_f64(),
        BULK_INTERVAL.as_secs_f64()
    );
    let config = write_config(dir.path(), &gateway_config.to_toml());
    let tally = Arc::new(Tally::default());
    let mut stored = emulator.stored();
    let mut resolutions = std::collections::BTreeMap::new();

    for kill in 0..KILLS {
        let gateway = Gateway::start(&config);
        let stop = Arc::new(AtomicBool::new(false));
        let device = tokio::spawn(lockstep_device(
            gateway.mqtt,
            format!("lockstep-{kill}"),
            tally.clone(),
            stop.clone(),
        ));
        // Load for a while; stop the device (its last publish is acked: nothing
        // in flight), then kill right after the next stored update: the
        // gateway has most likely not seen its echo yet.
        tokio::time::sleep(Duration::from_millis(700 + 97 * u64::from(kill % 7))).await;
        while stored.try_recv().is_ok() {}
        stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(WAIT, device)
            .await
            .expect("device ends")
            .unwrap();
        // What this run settled of the doubts the previous kill left (read
        // now, so that the kill follows the store as closely as it can).
        add_resolutions(
            &gateway.metric_family("tsgw_updates_in_doubt_total").await,
            &mut resolutions,
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stored.recv()).await {
                Ok(Ok(entry)) if entry.channel() == channel(CH) => break,
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                other => panic!(
                    "kill {kill}: no update stored in time ({other:?}); log:\n{}",
                    gateway.log_text()
                ),
            }
        }
        gateway.kill();
    }

    // The last run: load for a few seconds, then the queue must drain within
    // two intervals plus one confirm timeout of the load stopping.
    let gateway = Gateway::start(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let device = tokio::spawn(lockstep_device(
        gateway.mqtt,
        "lockstep-last".into(),
        tally.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(INTERVAL * 5).await;
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(WAIT, device)
        .await
        .expect("device ends")
        .unwrap();
    let stopped = Instant::now();
    let bound = INTERVAL * 2 + CONFIRM_TIMEOUT;
    loop {
        if gateway.metric("tsgw_queue_readings").await == 0.0 {
            break;
        }
        assert!(
            stopped.elapsed() <= bound,
            "queue not drained within {bound:?} of the load stopping; {} readings left; log:\n{}",
            gateway.metric("tsgw_queue_readings").await,
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let drained = stopped.elapsed();

    let acked = tally.acked.load(Ordering::SeqCst);
    let acked_seq_sum = tally.acked_seq_sum.load(Ordering::SeqCst);
    let cut_off = tally.cut_off.load(Ordering::SeqCst);
    let upstream = upstream_sum(&emulator, 1);
    let upstream_seq_sum = upstream_sum(&emulator, 2);
    let counters = emulator.counters();
    add_resolutions(
        &gateway.metric_family("tsgw_updates_in_doubt_total").await,
        &mut resolutions,
    );
    eprintln!(
        "in doubt (read key: {read_key}): {KILLS} kills, {acked} acked (seq sum {acked_seq_sum}), \
         {cut_off} cut off, upstream sum {upstream} (seq sum {upstream_seq_sum}), drained \
         {drained:?} after the load; emulator {counters:?}; doubts settled: {resolutions:?}"
    );
    assert!(acked > 1000, "load too light: {acked} acked");
    assert_eq!(cut_off, 0, "a publish was in flight at a kill");
    assert_eq!(
        upstream, acked,
        "upstream count {upstream} != {acked} acked (less: lost; more: stored twice)"
    );
    assert_eq!(
        upstream_seq_sum, acked_seq_sum,
        "upstream seq sum != acked seq sum (a lost and a duplicated reading cancelled in the count)"
    );
    let settled: f64 = ["echo", "read_api", "duplicate"]
        .iter()
        .filter_map(|r| resolutions.get(*r))
        .sum();
    assert!(
        settled >= 1.0,
        "no kill left an update in doubt that evidence settled: {resolutions:?}"
    );
    assert_eq!(
        resolutions.get("stored_differs").copied().unwrap_or(0.0),
        0.0,
        "windows are never merged under bulk backfill: {resolutions:?}"
    );
    assert_eq!(counters.dropped_rate_limit, 0, "{counters:?}");
    if read_key {
        assert!(
            counters.feed_reads > 0,
            "the read API was used: {counters:?}"
        );
        assert_eq!(counters.feed_reads_refused, 0, "{counters:?}");
    } else {
        assert!(
            counters.feed_reads_refused > 0,
            "without the key the read is refused and MQTT evidence settles: {counters:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_an_upstream_store_duplicates_nothing_with_a_read_key() {
    kill_loop(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_an_upstream_store_duplicates_nothing_over_mqtt_alone() {
    kill_loop(false).await;
}
