//! A store that cannot be opened is moved aside and a clean one started;
//! one that is merely busy or not ours to judge is reported, not moved.

mod common;

use std::fs;
use std::path::Path;

use common::{open, quarantined_dirs, reading};
use tsgw_core::{Metrics, ReadingStore};
use tsgw_queue::{DurableQueue, QueueError};

/// Fills a store with readings and closes it (flushing).
fn make_store(dir: &Path) {
    let (q, _) = open(dir);
    let batch: Vec<_> = (0..200).map(|i| reading(1 + i % 3, "dev", i)).collect();
    q.push(&batch).unwrap();
}

fn overwrite_files_with_garbage(dir: &Path) {
    let mut overwritten = 0;
    for entry in fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            let len = entry.metadata().unwrap().len().max(64) as usize;
            let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
            fs::write(entry.path(), garbage).unwrap();
            overwritten += 1;
        }
    }
    assert!(
        overwritten >= 2,
        "expected sled's conf and db files in {dir:?}"
    );
}

/// The store at `dir` is fresh, empty and usable, and the old one sits aside.
fn assert_quarantined_and_fresh(dir: &Path, queue: &DurableQueue, metrics: &Metrics) {
    assert_eq!(metrics.queue_quarantined_total.get(), 1);
    let aside = quarantined_dirs(dir);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].exists());
    assert!(queue.is_empty());
    queue.push(&[reading(9, "after", 1)]).unwrap();
    assert_eq!(queue.peek(common::ch(9), 10).unwrap().len(), 1);
}

#[test]
fn garbage_sled_files_are_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    make_store(&dir);
    overwrite_files_with_garbage(&dir);

    let (q, metrics) = open(&dir);
    assert_quarantined_and_fresh(&dir, &q, &metrics);
    drop(q);
    // The clean store reopens without another quarantine.
    let (q, metrics) = open(&dir);
    assert_eq!(metrics.queue_quarantined_total.get(), 0);
    assert_eq!(q.len(), 1);
}

#[test]
fn truncated_store_never_crashes_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    make_store(&dir);
    // Cut the data file in half: sled either recovers a prefix or reports it.
    let db = dir.join("db");
    let len = fs::metadata(&db).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (q, metrics) = open(&dir);
    let quarantined = metrics.queue_quarantined_total.get();
    eprintln!(
        "truncated store: quarantined {quarantined}, {} readings survived",
        q.len()
    );
    assert!(quarantined <= 1);
    assert_eq!(quarantined == 1, !quarantined_dirs(&dir).is_empty());
    q.push(&[reading(2, "after", 1)]).unwrap();
    // Whatever survived decodes, and counts match the content.
    assert_eq!(common::drain_view(&q).len() as u64, q.len());
}

#[test]
fn a_file_where_the_directory_should_be_is_moved_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    fs::write(&dir, b"not a directory").unwrap();
    let (q, metrics) = open(&dir);
    assert_quarantined_and_fresh(&dir, &q, &metrics);
    assert_eq!(
        fs::read(&quarantined_dirs(&dir)[0]).unwrap(),
        b"not a directory"
    );
}

#[test]
fn a_foreign_sled_store_is_moved_aside_not_mixed_in() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    {
        let db = sled::open(&dir).unwrap();
        db.insert(b"someone else's key", b"value").unwrap();
        db.flush().unwrap();
    }
    let (q, metrics) = open(&dir);
    assert_quarantined_and_fresh(&dir, &q, &metrics);
}

#[test]
fn a_locked_store_is_reported_not_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    let (first, _) = open(&dir);
    first.push(&[reading(1, "dev", 1)]).unwrap();

    let metrics = Metrics::new();
    let err = match DurableQueue::open(&common::config(&dir), metrics.clone()) {
        Err(e) => e,
        Ok(_) => panic!("a second open of a locked store succeeded"),
    };
    assert!(matches!(err, QueueError::Open { .. }), "{err}");
    assert!(err.to_string().contains("queue"), "{err}");
    assert_eq!(metrics.queue_quarantined_total.get(), 0);
    assert!(quarantined_dirs(&dir).is_empty());
    assert_eq!(first.len(), 1);
}

#[test]
fn a_data_file_that_recovers_empty_is_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    make_store(&dir);
    // Keep sled's `conf` intact so that sled itself opens the store: it treats
    // the damaged log as ended and recovers nothing, not even our format
    // marker, which gives the damage away.
    let db = dir.join("db");
    let len = fs::metadata(&db).unwrap().len() as usize;
    fs::write(
        &db,
        (0..len).map(|i| (i * 31 % 253) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let (q, metrics) = open(&dir);
    assert_quarantined_and_fresh(&dir, &q, &metrics);
}

#[test]
fn damage_in_the_middle_of_the_log_never_crashes_the_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    make_store(&dir);
    let db = dir.join("db");
    let mut bytes = fs::read(&db).unwrap();
    let len = bytes.len();
    for (i, b) in bytes.iter_mut().enumerate().skip(len / 4).take(len / 2) {
        *b = (i * 31 % 253) as u8;
    }
    fs::write(&db, bytes).unwrap();
    // sled keeps the log up to the damage: what survives must be consistent.
    let (q, _) = open(&dir);
    q.push(&[reading(2, "after", 1)]).unwrap();
    assert_eq!(common::drain_view(&q).len() as u64, q.len());
}

/// What ext4 can leave when power fails within seconds of the store's
/// creation (before writeback, with the files never fsynced): the names, with
/// empty contents. Nothing was acked into such a store (the open syncs the
/// files before it returns, see `durable_dir`), so it starts clean instead of
/// being quarantined as damaged.
#[test]
fn a_creation_cut_short_by_a_power_cut_starts_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    fs::create_dir_all(dir.join("blobs")).unwrap();
    fs::write(dir.join("conf"), b"").unwrap();
    fs::write(dir.join("db"), b"").unwrap();
    let (q, metrics) = open(&dir);
    assert_eq!(metrics.queue_quarantined_total.get(), 0);
    assert!(quarantined_dirs(&dir).is_empty());
    q.push(&[reading(4, "after", 1)]).unwrap();
    assert_eq!(q.len(), 1);
    // sled rewrote its settings, and they were synced with the store.
    assert!(fs::metadata(dir.join("conf")).unwrap().len() > 8);
}

/// An empty `conf` does not excuse a log holding someone else's data.
#[test]
fn an_empty_conf_beside_a_foreign_log_is_still_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("queue");
    {
        let db = sled::open(&dir).unwrap();
        db.insert(b"someone else's key", b"value").unwrap();
        db.flush().unwrap();
    }
    fs::write(dir.join("conf"), b"").unwrap();
    let (q, metrics) = open(&dir);
    assert_quarantined_and_fresh(&dir, &q, &metrics);
}
