//! Crash safety: a child process pushes readings and is SIGKILLed mid-stream,
//! again and again on the same store. After each kill the store must open
//! without quarantine, and every reading the child reported durable must be
//! there, exactly once, with seqs above every earlier one.
//!
//! The child is this test binary re-executed with `--ignored --exact
//! crash_child`; the environment tells it which store, round and mode to use.
//! It prints `DURABLE <count>` after each point where the first `count` of its
//! readings are known to be on disk.
//!
//! SIGKILL tests the process dying at any instruction (torn sled writes, no
//! destructors); it does not cut power, so the kernel's page cache survives.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{drain_view, open, reading};
use tokio_util::sync::CancellationToken;
use tsgw_core::ReadingStore;

const ENV_DIR: &str = "TSGW_QUEUE_CRASH_DIR";
const ENV_ROUND: &str = "TSGW_QUEUE_CRASH_ROUND";
const ENV_MODE: &str = "TSGW_QUEUE_CRASH_MODE";
/// Child flushes explicitly after each batch of this many readings.
const BATCH: u64 = 10;
/// Readings per fill in "swap" mode.
const SWAP_BATCH: u64 = 2_000;
/// Flush interval the child's flusher uses (`common::config`).
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

#[test]
#[ignore = "child process of the crash tests; started by them with --ignored"]
fn crash_child() {
    let dir = std::env::var(ENV_DIR).expect("crash child needs its store dir");
    let round = std::env::var(ENV_ROUND).expect("crash child needs its round");
    let mode = std::env::var(ENV_MODE).expect("crash child needs its mode");
    let device = format!("round{round}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (queue, _) = open(Path::new(&dir));
        match mode.as_str() {
            // Explicit flush after each batch: everything before a DURABLE line is on disk.
            "flush" => {
                for b in 0u64.. {
                    let batch: Vec<_> = (0..BATCH)
                        .map(|k| reading(1 + (b + k) % 3, &device, b * BATCH + k))
                        .collect();
                    queue.push(&batch).unwrap();
                    queue.flush().await.unwrap();
                    println!("DURABLE {}", (b + 1) * BATCH);
                }
            }
            // Only the flusher task flushes: the parent allows it the interval plus slack.
            "flusher" => {
                let _flusher = queue.spawn_flusher(CancellationToken::new());
                for n in 0u64.. {
                    queue.push(&[reading(1 + n % 3, &device, n)]).unwrap();
                    println!("PUSHED {}", n + 1);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            // A clean shutdown: no periodic flush (the interval is an hour), only
            // the flusher's final one on cancel; then the process hangs until killed.
            "shutdown" => {
                let mut config = common::config(Path::new(&dir));
                config.flush_interval_ms = 3_600_000;
                drop(queue);
                let queue =
                    tsgw_queue::DurableQueue::open(&config, tsgw_core::Metrics::new()).unwrap();
                let shutdown = CancellationToken::new();
                let flusher = queue.spawn_flusher(shutdown.clone());
                // Let the flusher's first (immediate) tick pass before writing.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let batch: Vec<_> = (0..500).map(|n| reading(1 + n % 3, &device, n)).collect();
                queue.push(&batch).unwrap();
                shutdown.cancel();
                flusher.await.unwrap();
                println!("DURABLE 500");
                // Keep the queue alive: its Drop would flush and hide a missing final flush.
                std::future::pending::<()>().await;
            }
            // Fill, flush, drain, move to a fresh store, again and again: a
            // kill lands anywhere in the move. "DURABLE 2b+1": batch b is on
            // disk; "DURABLE 2b+2": its removal starts.
            "swap" => {
                for b in 0u64.. {
                    let batch: Vec<_> = (0..SWAP_BATCH)
                        .map(|k| reading(1 + k % 3, &device, b * SWAP_BATCH + k))
                        .collect();
                    queue.push(&batch).unwrap();
                    queue.flush().await.unwrap();
                    println!("DURABLE {}", 2 * b + 1);
                    println!("DURABLE {}", 2 * b + 2);
                    let keys: Vec<_> = drain_keys(&queue);
                    queue.remove(&keys).unwrap();
                    queue.flush().await.unwrap();
                    assert!(queue.return_space_if_drained(0).unwrap());
                }
            }
            other => panic!("unknown crash child mode {other:?}"),
        }
    });
}

/// Runs one child until `kill_after` past its first report, SIGKILLs it and
/// returns the count it reported durable (for "flusher" mode: pushed at least
/// `grace` before the kill).
fn run_child(dir: &Path, round: u32, mode: &str, kill_after: Duration, grace: Duration) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_DIR, dir)
        .env(ENV_ROUND, round.to_string())
        .env(ENV_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let count = line
                .strip_prefix("DURABLE ")
                .or_else(|| line.strip_prefix("PUSHED "))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(n) = count {
                if tx.send((n, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });

    let mut reports = Vec::new();
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("crash child of round {round} reported nothing within 30 s");
        });
    reports.push(first);
    let kill_at = first.1 + kill_after;
    while let Some(left) = kill_at.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(r) => reports.push(r),
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("crash child of round {round} exited early")
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    let killed_at = Instant::now();
    child.wait().unwrap();
    // Lines already written before the kill still count.
    reader.join().unwrap();
    reports.extend(rx.try_iter());
    reports
        .iter()
        .filter(|(_, at)| *at + grace <= killed_at)
        .map(|(n, _)| *n)
        .max()
        .unwrap_or(0)
}

/// Reopens the store after round `round` and checks it; returns the highest seq.
fn check_after_kill(dir: &Path, round: u32, durable: u64, previous_max_seq: u64) -> u64 {
    let (queue, metrics) = open(dir);
    assert_eq!(
        metrics.queue_quarantined_total.get(),
        0,
        "store needed quarantine after kill in round {round}"
    );
    let all = drain_view(&queue);
    assert_eq!(all.len() as u64, queue.len(), "counts do not match content");
    let device = format!("round{round}");
    let mut seen = BTreeSet::new();
    for (seq, r) in all.iter().filter(|(_, r)| r.origin.device == device) {
        assert!(
            *seq > previous_max_seq,
            "round {round}: seq {seq} not above {previous_max_seq}"
        );
        let n = r.value.as_f64().unwrap() as u64;
        assert!(seen.insert(n), "round {round}: reading {n} stored twice");
        assert_eq!(
            *r,
            reading(r.channel.get(), &device, n),
            "round {round}: reading {n} altered"
        );
    }
    let missing: Vec<u64> = (0..durable).filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "round {round}: {} of {durable} durable readings missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    eprintln!(
        "round {round}: {durable} reported durable, {} found",
        seen.len()
    );
    all.iter()
        .map(|(seq, _)| *seq)
        .max()
        .unwrap_or(0)
        .max(previous_max_seq)
}

#[test]
fn killed_writer_keeps_every_flushed_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let mut max_seq = 0;
    // Spread the kills over different points of the write/flush cycle.
    let kill_after_ms = [130, 470, 260, 610, 90, 350, 520, 200];
    for (round, ms) in kill_after_ms.iter().enumerate() {
        let round = round as u32;
        let durable = run_child(
            &dir,
            round,
            "flush",
            Duration::from_millis(*ms),
            Duration::ZERO,
        );
        assert!(durable > 0, "round {round}: child reported nothing durable");
        max_seq = check_after_kill(&dir, round, durable, max_seq);
    }
}

#[test]
fn flusher_makes_readings_durable_within_its_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let mut max_seq = 0;
    // A reading must be on disk one interval after push; the slack covers a
    // slow fsync on a busy machine.
    let grace = FLUSH_INTERVAL + Duration::from_millis(950);
    for round in 0..2 {
        let durable = run_child(&dir, round, "flusher", Duration::from_millis(2_500), grace);
        assert!(
            durable > 0,
            "round {round}: nothing was pushed long enough before the kill"
        );
        max_seq = check_after_kill(&dir, round, durable, max_seq);
    }
}

#[test]
fn cancelling_the_flusher_flushes_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    // Kill 300 ms after the child reported its final flush done.
    let durable = run_child(
        &dir,
        0,
        "shutdown",
        Duration::from_millis(300),
        Duration::ZERO,
    );
    assert_eq!(durable, 500);
    check_after_kill(&dir, 0, durable, 0);
}

/// Every key the queue holds.
fn drain_keys(queue: &tsgw_queue::DurableQueue) -> Vec<tsgw_core::QueueKey> {
    queue
        .channels()
        .unwrap()
        .into_iter()
        .flat_map(|c| queue.peek(c, usize::MAX).unwrap())
        .map(|q| q.key)
        .collect()
}

#[test]
fn killed_while_moving_to_a_fresh_store_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let mut max_seq = 0;
    let kill_after_ms = [
        40, 310, 120, 560, 75, 230, 410, 160, 95, 270, 55, 185, 345, 130, 65, 210,
    ];
    for (round, ms) in kill_after_ms.iter().enumerate() {
        let round = round as u32;
        let reported = run_child(
            &dir,
            round,
            "swap",
            Duration::from_millis(*ms),
            Duration::ZERO,
        );
        let batch = (reported - 1) / 2;
        let draining = reported.is_multiple_of(2);
        let (queue, metrics) = open(&dir);
        assert_eq!(metrics.queue_quarantined_total.get(), 0, "round {round}");
        // Open finished or undid the interrupted move.
        let siblings: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(siblings, vec!["queue".to_string()], "round {round}");
        let all = drain_view(&queue);
        assert_eq!(
            all.len() as u64,
            queue.len(),
            "round {round}: counts do not match content"
        );
        let device = format!("round{round}");
        let ours: Vec<(u64, u64)> = all
            .iter()
            .filter(|(_, r)| r.origin.device == device)
            .map(|(seq, r)| (*seq, r.value.as_f64().unwrap() as u64))
            .collect();
        for (seq, _) in &ours {
            assert!(
                *seq > max_seq,
                "round {round}: seq {seq} not above {max_seq}"
            );
        }
        let durable = batch * SWAP_BATCH..(batch + 1) * SWAP_BATCH;
        let kept = ours.iter().filter(|(_, v)| durable.contains(v)).count() as u64;
        assert!(
            ours.iter()
                .all(|(_, v)| *v >= durable.start && *v < durable.end + SWAP_BATCH),
            "round {round}: readings of batches before {batch} survived their drain"
        );
        if draining {
            // Its removal may have reached the disk: all of it or none.
            assert!(
                kept == 0 || kept == SWAP_BATCH,
                "round {round}: {kept} of batch {batch}"
            );
        } else {
            assert_eq!(
                kept, SWAP_BATCH,
                "round {round}: durable batch {batch} lost readings"
            );
        }
        eprintln!(
            "round {round}: killed after batch {batch} ({}), {} of ours left",
            if draining { "draining" } else { "durable" },
            ours.len()
        );
        max_seq = all
            .iter()
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(0)
            .max(max_seq);
    }
}
