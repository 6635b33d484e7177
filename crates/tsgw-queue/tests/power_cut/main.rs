//! Power cuts, simulated by a file system that keeps only fsynced bytes
//! (`fs.rs`: a FUSE file system in this process; see there for what it
//! models and what it does not).
//!
//! The store lives on the FUSE mount. A writer opens it through the queue
//! library (creating it), then pushes batches of readings and flushes each;
//! a batch counts as acked once its flush returned (what the local broker
//! waits for before a QoS 1 PUBACK). Meanwhile the test cuts power: it reads
//! the acked count, then takes what a cut at that instant leaves, in both of
//! the file system's renderings. Cuts fall densely in the first second after
//! the store's creation and at random after it. Each image is copied to a real
//! directory and opened with the queue library.
//!
//! SIGKILL tests (`crash.rs`) keep the page cache; these do not. They need
//! `/dev/fuse` and the right to mount (root, as in CI); without them they fail
//! with that reason rather than pass unseen.

#[path = "../common/mod.rs"]
mod common;
mod fs;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fs::{Cut, Image, PowerCut};
use tsgw_core::{Metrics, Value};
use tsgw_queue::DurableQueue;

const DEVICE: &str = "cut";
/// Readings per push (one flush each).
const BATCH: u64 = 20;
/// How long the writer runs.
const RUN: Duration = Duration::from_millis(3000);
/// Cuts in the first second after the writer started creating the store, ms.
const EARLY_CUTS_MS: [u64; 14] = [0, 5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 550, 750, 950];
/// Cuts after the first second, at random.
const LATE_CUTS: usize = 6;

struct Taken {
    at: Duration,
    acked: u64,
    cut: Cut,
    image: Image,
}

/// Mounts a fresh power-cut file system, runs the writer on it for [`RUN`]
/// while cutting, and returns the cuts.
fn cut_while_writing() -> Vec<Taken> {
    let mnt = tempfile::tempdir().unwrap();
    let (power, fs) = PowerCut::new();
    let session = fuser::spawn_mount2(
        fs,
        mnt.path(),
        &[fuser::MountOption::FSName("tsgw-power-cut".into())],
    )
    .unwrap_or_else(|e| {
        panic!(
            "cannot mount the power-cut FUSE file system at {}: {e} \
             (it needs /dev/fuse and the right to mount, e.g. root)",
            mnt.path().display()
        )
    });

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let store = mnt.path().join("queue");
    let started = Instant::now();
    let writer = {
        let (acked, stop, store) = (acked.clone(), stop.clone(), store.clone());
        std::thread::spawn(move || write_until_stopped(&store, &acked, &stop))
    };

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    eprintln!("late cut times from seed {seed}");
    let mut rng = seed;
    let mut times: Vec<Duration> = EARLY_CUTS_MS.map(Duration::from_millis).to_vec();
    for _ in 0..LATE_CUTS {
        // xorshift: reproducible from the printed seed.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        times.push(Duration::from_millis(
            1000 + rng % (RUN.as_millis() as u64 - 1100),
        ));
    }
    times.sort();

    let mut taken = Vec::new();
    for at in times {
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        // Acked before the cut, so the cut must keep it.
        let acked_now = acked.load(Ordering::SeqCst);
        for cut in [Cut::Strict, Cut::MetadataOnly] {
            taken.push(Taken {
                at: started.elapsed(),
                acked: acked_now,
                cut,
                image: power.image(cut),
            });
        }
    }
    if let Some(wait) = RUN.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    let (file_syncs, dir_syncs) = power.syncs();
    eprintln!(
        "writer acked {} readings; the file system saw {file_syncs} file fsyncs, {dir_syncs} directory fsyncs",
        acked.load(Ordering::SeqCst)
    );
    drop(session); // unmounts
    taken
}

fn write_until_stopped(store: &Path, acked: &AtomicU64, stop: &AtomicBool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (queue, _) = common::open(store);
        let mut n = 0;
        while !stop.load(Ordering::SeqCst) {
            let batch: Vec<_> = (n..n + BATCH)
                .map(|i| common::reading(1 + i % 3, DEVICE, i))
                .collect();
            queue.push(&batch).unwrap();
            queue.flush().await.unwrap();
            n += BATCH;
            acked.store(n, Ordering::SeqCst);
        }
        drop(queue);
    });
}

/// What opening one image gave.
struct Reopened {
    quarantined: u64,
    /// Readings of [`DEVICE`] found, by number.
    present: BTreeSet<u64>,
}

fn reopen(image: &Image, work: &Path) -> Reopened {
    image.materialize(work).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let metrics = Metrics::new();
        let queue = DurableQueue::open(&common::config(&work.join("queue")), metrics.clone())
            .unwrap_or_else(|e| panic!("the store left by a power cut does not open: {e}"));
        let present = common::drain_view(&queue)
            .into_iter()
            .filter(|(_, r)| r.origin.device == DEVICE)
            .filter_map(|(_, r)| match r.value {
                Value::Number(v) => Some(v as u64),
                _ => None,
            })
            .collect();
        let reopened = Reopened {
            quarantined: metrics.queue_quarantined_total.get(),
            present,
        };
        drop(queue);
        reopened
    })
}

fn describe(t: &Taken, r: &Reopened) -> String {
    let missing = (0..t.acked).filter(|n| !r.present.contains(n)).count();
    format!(
        "cut at {:>5} ms ({:?}): acked {:>5}, present {:>5}, acked but missing {missing:>5}, quarantined {}; files {:?}",
        t.at.as_millis(),
        t.cut,
        t.acked,
        r.present.len(),
        r.quarantined,
        t.image
            .files
            .iter()
            .map(|(p, b)| format!("{}={}B", p.display(), b.len()))
            .collect::<Vec<_>>()
    )
}

/// sled's `conf` and the store's names must survive a cut from the first
/// millisecond: before `durable_dir`, a cut within seconds of creation left
/// an empty `conf` and the store was quarantined.
#[test]
fn power_cuts_from_the_first_second_never_quarantine_the_store() {
    let work = tempfile::tempdir().unwrap();
    let taken = cut_while_writing();
    let mut failures = Vec::new();
    for (i, t) in taken.iter().enumerate() {
        let r = reopen(&t.image, &work.path().join(format!("cut-{i}")));
        let line = describe(t, &r);
        eprintln!("{line}");
        if r.quarantined != 0 {
            failures.push(line);
        }
    }
    // Not vacuous: once the store is created, every later cut keeps its files.
    let late = taken.iter().filter(|t| t.at > Duration::from_millis(1000));
    for t in late {
        let conf = t.image.file("queue/conf").map(<[u8]>::len);
        assert!(
            conf.is_some_and(|len| len > 8),
            "a cut at {:?} ({:?}) lost sled's conf: {conf:?}",
            t.at,
            t.cut
        );
    }
    assert!(
        failures.is_empty(),
        "quarantined after a cut:\n{}",
        failures.join("\n")
    );
}

/// Every reading acked before a cut (its flush returned) is in the store
/// the cut left. sled's flush syncs its log with `sync_file_range`, which does
/// not make appended data durable (the file's new size and extents wait for the
/// next journal commit on ext4, up to 5 s; the issue measured about 2 s of
/// acked readings lost per cut), so the queue's flush also fdatasyncs sled's
/// `db` file (queue.rs); without that this test fails.
#[test]
fn power_cuts_keep_every_acked_reading() {
    let work = tempfile::tempdir().unwrap();
    let taken = cut_while_writing();
    let mut failures = Vec::new();
    for (i, t) in taken.iter().enumerate() {
        let r = reopen(&t.image, &work.path().join(format!("cut-{i}")));
        let line = describe(t, &r);
        eprintln!("{line}");
        if r.quarantined != 0 || (0..t.acked).any(|n| !r.present.contains(&n)) {
            failures.push(line);
        }
    }
    assert!(
        taken.iter().any(|t| t.acked > 0),
        "no reading was acked before the last cut: the test proved nothing"
    );
    assert!(
        failures.is_empty(),
        "acked readings lost:\n{}",
        failures.join("\n")
    );
}
