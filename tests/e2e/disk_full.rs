//! Issue #8, "Disk full": the queue's file system fills up under the running
//! gateway. It keeps running, drops by the documented policy
//! (`tsgw_queue_dropped_total{reason="write_error"}`, with an error log line),
//! keeps what it had flushed, and works again without a restart once space
//! returns.
//!
//! The gateway runs in a private mount namespace whose queue directory is a
//! small tmpfs: a real ENOSPC from the kernel, not a simulated one, and no
//! loop device or host mount left behind if the test dies (the mount goes
//! away with the namespace). The test reaches that tmpfs through
//! `/proc/<gateway pid>/root`, fills it with a filler file, then deletes it.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Size of the tmpfs holding the queue. It hardly matters: a fresh sled store
/// takes 8 KiB and the filler takes whatever is left.
const TMPFS_KIB: u64 = 4 * 1024;
/// `queue.max_bytes`, far above the tmpfs: the disk must give out first, so
/// every drop here is a write error, never the queue's own "full" policy.
const MAX_BYTES: &str = "67108864";

const ACCEPTED: &str = r#"tsgw_readings_total{device="drop_in",result="accepted",source="mqtt"}"#;
const WRITE_ERROR: &str = r#"tsgw_queue_dropped_total{reason="write_error"}"#;
const FULL: &str = r#"tsgw_queue_dropped_total{reason="full"}"#;
const QUEUED: &str = "tsgw_queue_readings";

/// Readings before the disk fills go to channel 1001, while it is full to
/// 1002, after it has room again to 1003: a surviving "during" reading can
/// never be merged into (and so hide) a "before" or "after" value.
const BEFORE: u64 = CHANNELS[0];
const DURING: u64 = CHANNELS[1];
const AFTER: u64 = CHANNELS[2];

/// How `unshare` can give us a private mount namespace here: plain `-m` works
/// for root, `-rm` (a user namespace with root mapped) for other users where
/// unprivileged user namespaces are enabled. When neither can mount a tmpfs,
/// the error says why each failed.
fn unshare_flavour(mount_point: &Path) -> Result<&'static [&'static str], String> {
    let mut reasons = Vec::new();
    for flavour in [&["--mount"][..], &["--map-root-user", "--mount"][..]] {
        let out = Command::new("unshare")
            .args(flavour)
            .args(["--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=64k tmpfs "$1""#)
            .arg("sh")
            .arg(mount_point)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => return Ok(flavour),
            Ok(out) => reasons.push(format!(
                "unshare {}: {} {}",
                flavour.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => reasons.push(format!("unshare {}: {e}", flavour.join(" "))),
        }
    }
    Err(reasons.join("; "))
}

/// The gateway, exec'd by a shell that first mounted a `TMPFS_KIB` tmpfs on
/// `mount_point` in a private mount namespace.
fn start_on_tmpfs(flavour: &[&str], mount_point: &Path, config: &Path) -> Gateway {
    let mut command = Command::new("unshare");
    command
        .args(flavour)
        .args(["--propagation", "private", "sh", "-c"])
        .arg(format!(
            r#"mount -t tmpfs -o size={TMPFS_KIB}k tmpfs "$1" && exec "$2" run --config "$3""#
        ))
        .arg("sh")
        .arg(mount_point)
        .arg(tsgw())
        .arg(config)
        .env("TSGW_QUEUE__MAX_BYTES", MAX_BYTES);
    Gateway::start_command(command)
}

/// `path` as the gateway sees it, inside its mount namespace.
fn inside(gateway: &Gateway, path: &Path) -> PathBuf {
    let relative = path.strip_prefix("/").expect("absolute path");
    Path::new(&format!("/proc/{}/root", gateway.pid())).join(relative)
}

/// Writes `path` until the file system says ENOSPC; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = File::create(path).expect("filler file created");
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == ErrorKind::StorageFull => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("filling {} failed: {e}", path.display()),
        }
        assert!(
            written <= TMPFS_KIB * 1024,
            "wrote more than the tmpfs holds: is {} on it?",
            path.display()
        );
    }
    // A page-sized tail may be left: fill it byte by byte.
    while let Ok(n @ 1..) = file.write(&chunk[..1]) {
        written += n as u64;
    }
    written
}

/// Free and total KiB of the file system holding `path` (`statfs` on the path
/// itself: `df` would report the mount it finds in the test's namespace).
fn free_kib(path: &Path) -> String {
    Command::new("stat")
        .args(["-f", "-c", "%f %b %S"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let v: Vec<u64> = text
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect();
            match v[..] {
                [free, total, block] => Some(format!(
                    "{} of {} KiB free",
                    free * block / 1024,
                    total * block / 1024
                )),
                _ => None,
            }
        })
        .unwrap_or_else(|| "(statfs failed)".into())
}

/// Waits until `metric` is at least `at_least`; returns its value.
async fn wait_metric(gateway: &Gateway, metric: &str, at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = gateway.metric(metric).await;
        if v >= at_least {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{metric} stayed at {v} (< {at_least}); log:\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Accepted, queued and dropped (write_error), once two reads half a second
/// apart agree.
async fn settled(gateway: &Gateway) -> (f64, f64, f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let read = || async {
        (
            gateway.metric(ACCEPTED).await,
            gateway.metric(QUEUED).await,
            gateway.metric(WRITE_ERROR).await,
        )
    };
    let mut last = read().await;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = read().await;
        if now == last {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the counters never settled: {now:?}; log:\n{}",
            gateway.log_text()
        );
        last = now;
    }
}

/// What the scenario observed, as the gateway's own counters say.
struct Outcome {
    /// Readings the local broker handed to the queue writer.
    accepted: f64,
    /// Readings in the queue once it recovered (upstream was down throughout).
    queued: f64,
    /// `tsgw_queue_dropped_total{reason="write_error"}` at that point.
    dropped: f64,
}

impl Outcome {
    /// Readings that were neither queued nor counted as dropped.
    fn uncounted(&self) -> f64 {
        self.accepted - self.queued - self.dropped
    }
}

/// Fills the queue's disk under a running gateway, checks that it keeps
/// running, drops by the policy and says so, frees the space, checks that it
/// recovers without a restart and, with upstream back, that what was flushed
/// before and what came after arrive. Returns the counters from just before
/// upstream came back; `None` when this machine cannot mount a tmpfs.
async fn fill_the_disk_and_free_it() -> Option<Outcome> {
    let started = Instant::now();
    let emulator = emulator(Duration::from_secs(1)).await;
    // Upstream refuses until the end: readings can only be in the queue (or
    // dropped), so the counters below are exact and the disk fills with them.
    emulator.refuse_connections_for(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let flavour = match unshare_flavour(&data) {
        Ok(f) => f,
        Err(reason) => {
            eprintln!(
                "\n*** SKIPPED disk_full: cannot mount a tmpfs in a private mount namespace \
                 (needs root or unprivileged user namespaces): {reason} ***\n"
            );
            return None;
        }
    };
    let config = write_config(dir.path(), &config_toml(&emulator, &data, 1.0, ""));
    let mut gateway = start_on_tmpfs(flavour, &data, &config);
    let mount = inside(&gateway, &data);
    assert!(
        mount.join("queue").is_dir(),
        "the queue is not on the tmpfs at {}",
        mount.display()
    );
    // The gateway acks a QoS 1 publish only once it is on disk: while the
    // disk is full the device gets no ack and must send it again after the
    // gateway closes the connection, which needs a persistent session.
    let dev = persistent_device(gateway.mqtt, "disk-filler").await;

    // Before: 8 readings, flushed (the flush interval is 200 ms).
    publish_channel(&dev, BEFORE, "b").await;
    wait_metric(&gateway, QUEUED, 8.0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    eprintln!("tmpfs before filling: {}", free_kib(&mount));

    // The disk fills up.
    let filler = mount.join("filler");
    let filled = fill(&filler);
    let filled_at = Instant::now();
    eprintln!("filler: {filled} bytes; tmpfs: {}", free_kib(&mount));

    // During: keep publishing until the queue reports write errors. sled
    // buffers in memory and writes at the flush, and the last page of its
    // file may still take a few records, so the first rounds can still land.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut during_rounds = 0u32;
    while gateway.metric(WRITE_ERROR).await == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no write error after {during_rounds} rounds on a full disk; log:\n{}",
            gateway.log_text()
        );
        publish_channel(&dev, DURING, &format!("d{during_rounds}-")).await;
        during_rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_drop_after = filled_at.elapsed();
    // A few more rounds while full: the gateway keeps taking them in and counting them.
    for _ in 0..5 {
        publish_channel(&dev, DURING, &format!("d{during_rounds}-")).await;
        during_rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let accepted = wait_metric(&gateway, ACCEPTED, 8.0 * (1 + during_rounds) as f64).await;
    // Past a few flush intervals: the flusher has met the error and is retrying.
    tokio::time::sleep(Duration::from_millis(600)).await;

    // Alive, healthy (the writer makes progress: it drops), and it says why.
    assert!(
        gateway.child.try_wait().unwrap().is_none(),
        "the gateway exited on a full disk; log:\n{}",
        gateway.log_text()
    );
    let (status, body) = gateway.get("/healthz").await;
    assert_eq!(status, 200, "not alive on a full disk: {body}");
    let dropped_while_full = gateway.metric(WRITE_ERROR).await;
    assert!(
        dropped_while_full >= 8.0 * 5.0,
        "the 5 rounds published after the first write error were not all dropped: {dropped_while_full}"
    );
    assert_eq!(
        gateway.metric(FULL).await,
        0.0,
        "queue.max_bytes must not be what dropped"
    );
    let log = gateway.log_text();
    assert!(
        log.contains("cannot store readings in the queue; they are dropped")
            && log.contains("No space left on device"),
        "no error line naming the full disk; log:\n{log}"
    );
    let reopens = || gateway.count_log("queue store reopened after a storage error");
    assert!(
        log.contains("queue store still unusable"),
        "the store should be failed and retrying while the disk is full; log:\n{log}"
    );
    let reopens_while_full = reopens();
    eprintln!(
        "full disk: first write error {first_drop_after:?} after filling; \
         {during_rounds} rounds ({} readings) published, accepted {accepted}, \
         dropped {dropped_while_full} (write_error), gauge says queued {}",
        8 * during_rounds,
        gateway.metric(QUEUED).await
    );

    // Space returns: the filler goes, no restart.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    eprintln!("filler removed; tmpfs: {}", free_kib(&mount));
    let deadline = tokio::time::Instant::now() + WAIT;
    while reopens() == reopens_while_full {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store was not reopened after space returned; log:\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered_in = freed.elapsed();

    // After: a round is stored without a write error.
    let dropped = gateway.metric(WRITE_ERROR).await;
    let queued_before = gateway.metric(QUEUED).await;
    publish_channel(&dev, AFTER, "a").await;
    wait_metric(&gateway, ACCEPTED, accepted + 8.0).await;
    wait_metric(&gateway, QUEUED, queued_before + 8.0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gateway.metric(WRITE_ERROR).await,
        dropped,
        "writes still fail after space returned; log:\n{}",
        gateway.log_text()
    );
    // The device still sends what the full disk left unacknowledged (it
    // resends after every reconnect): read the three counters together once
    // that traffic has settled, or a reading accepted between two reads
    // would look made up.
    let (accepted, queued, dropped) = settled(&gateway).await;
    let outcome = Outcome {
        accepted,
        queued,
        dropped,
    };
    // Nothing is counted twice or made up; `uncounted` is what vanished silently.
    assert!(
        outcome.uncounted() >= 0.0,
        "queued {} + dropped {dropped} > accepted {accepted}",
        outcome.queued
    );
    eprintln!(
        "store reopened {recovered_in:?} after the filler went; accepted {accepted}, \
         queued {}, dropped {dropped} (write_error), uncounted {}",
        outcome.queued,
        outcome.uncounted()
    );

    // Upstream is back: what was flushed before the disk filled and what came
    // after it had room again both arrive, and the queue drains.
    emulator.clear_faults();
    wait_for_delivery(
        &emulator,
        "the readings flushed before the disk filled",
        |got| channel_delivered(got, BEFORE, "b"),
    )
    .await;
    wait_for_delivery(&emulator, "the readings after space returned", |got| {
        channel_delivered(got, AFTER, "a")
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.metric(QUEUED).await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(emulator.counters().dropped_rate_limit, 0);
    assert_eq!(gateway.metric(WRITE_ERROR).await, dropped);
    let status = gateway.stop();
    assert!(status.success(), "{status:?}");
    eprintln!("disk-full scenario took {:?}", started.elapsed());
    Some(outcome)
}

/// Every reading the gateway accepted is either still queued or counted as
/// dropped, including the ones a failed flush took away after their push had
/// succeeded into sled's memory (the queue finds those when it reopens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_counted_readings_and_the_queue_recovers_without_restart() {
    if let Some(outcome) = fill_the_disk_and_free_it().await {
        assert_eq!(
            outcome.uncounted(),
            0.0,
            "accepted {} = queued {} + dropped {} must hold",
            outcome.accepted,
            outcome.queued,
            outcome.dropped
        );
    }
}
