//! A disk that refuses writes (full, or a file-size limit) makes `push` or
//! `flush` return an error; nothing panics; once writes work again the
//! flusher reopens the store and the queue resumes without a restart.
//!
//! The child (this binary re-executed) limits its own file size with
//! RLIMIT_FSIZE, the same EFBIG/ENOSPC-style write failure a full SD card
//! gives, without needing a real full file system.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{open, reading};
use tokio_util::sync::CancellationToken;
use tsgw_core::ReadingStore;

const ENV_DIR: &str = "TSGW_QUEUE_DISKFULL_DIR";

#[test]
#[ignore = "child process of the disk-full test; started by it with --ignored"]
fn disk_full_child() {
    let dir = std::env::var(ENV_DIR).expect("disk-full child needs its store dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (queue, _) = open(Path::new(&dir));
        let first: Vec<_> = (0..100).map(|n| reading(1, "before", n)).collect();
        queue.push(&first).unwrap();
        queue.flush().await.unwrap();
        println!("FLUSHED 100");

        let db_len = std::fs::metadata(Path::new(&dir).join("db")).unwrap().len();
        limit_file_size(db_len + 64 * 1024);
        let mut n = 0u64;
        let err = loop {
            let batch: Vec<_> = (0..20).map(|k| reading(2, "after", n + k)).collect();
            if let Err(e) = queue.push(&batch) {
                break e;
            }
            if let Err(e) = queue.flush().await {
                break e;
            }
            n += 20;
            assert!(
                n < 1_000_000,
                "writes never failed under a 64 KiB file-size limit"
            );
        };
        println!("WRITE ERROR after {n}: {err}");
        // The queue keeps answering (with errors or data), without panicking.
        // sled stays failed: pushes keep failing while the disk is full.
        assert!(queue.push(&[reading(3, "later", 0)]).is_err());

        // The disk is cleaned up; the flusher reopens the store.
        let flusher = queue.spawn_flusher(CancellationToken::new());
        unlimit_file_size();
        let recovered = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if queue.push(&[reading(3, "later", 0)]).is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            recovered.is_ok(),
            "queue did not recover after the disk had room again"
        );
        queue.flush().await.unwrap();
        flusher.abort();
        println!("RECOVERED");
        println!("CHILD DONE");
    });
}

/// Lowers the soft limit only, so that it can be raised again.
fn limit_file_size(bytes: u64) {
    // SAFETY: plain libc calls on this process; writes past the limit then
    // fail with EFBIG instead of killing the process with SIGXFSZ.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes as libc::rlim_t;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

fn unlimit_file_size() {
    // SAFETY: as above; raising the soft limit back to the hard one.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[test]
fn write_failures_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "disk_full_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_DIR, &dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bound the wait: kill the child if it hangs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "disk-full child hung");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("child stdout:\n{stdout}\nchild stderr:\n{stderr}");
    assert!(stdout.contains("WRITE ERROR"), "no write error surfaced");
    assert!(stdout.contains("RECOVERED"), "queue did not recover");
    assert!(
        stdout.contains("CHILD DONE"),
        "child did not finish cleanly"
    );
    assert!(out.status.success(), "child failed: {:?}", out.status);
    assert!(!stderr.contains("panicked"), "something panicked");

    // With the limit gone, the store opens and keeps what was flushed.
    let (queue, metrics) = open(&dir);
    assert_eq!(metrics.queue_quarantined_total.get(), 0);
    let before = queue
        .peek(common::ch(1), 1000)
        .unwrap()
        .into_iter()
        .filter(|q| q.reading.origin.device == "before")
        .count();
    assert_eq!(before, 100);
    // The push made after recovery was flushed too.
    assert_eq!(queue.peek(common::ch(3), 10).unwrap().len(), 1);
}
