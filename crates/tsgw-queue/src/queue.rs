//! The durable queue: readings on disk between ingest and upstream.
//!
//! Every mutation (push, remove, dropping a corrupt value) runs under one mutex,
//! so the in-memory counts always match the store and the "oldest first"
//! eviction never races a removal. Reads (`peek`, `oldest`) take no lock: sled's
//! iterators are consistent per key, and a key that vanishes between a peek and
//! its removal is simply ignored by `remove`.
//!
//! sled keeps the first I/O error it meets and fails every later operation.
//! So any storage error marks the queue failed, and the flusher then closes
//! and reopens the store (quarantining it if it no longer opens)
//! until that works: after a full disk has been cleaned up, the queue resumes
//! without a restart. Meanwhile operations return [`QueueError::Unavailable`]
//! or the storage error.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tracing::{error, info, warn};
use tsgw_core::{ChannelId, Metrics, QueueKey, Queued, Reading, ReadingStore, StoreError};

use crate::codec::{
    channel_prefix, claimed_len, decode_key, decode_measured_at, decode_record, encode_key,
    encode_record, record_len, KEY_LEN, MAX_RECORD_READINGS,
};
use crate::config::QueueConfig;
use crate::droplog::DropLog;
use crate::error::QueueError;
use crate::intent::{self, INTENT_KEY};
use crate::occupancy::{Counts, COUNTS_KEY};
use crate::open::open_or_quarantine;
use crate::progress::OpenProgress;
use crate::swap;
use crate::unflushed::Unflushed;

/// At most one "queue full" warning per this period (with the count since the last).
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);
/// At most one "store still failing" error per this period while reopening.
const REOPEN_LOG_EVERY: Duration = Duration::from_secs(60);

/// The on-disk queue of readings. Cheap to clone: all clones share one store.
#[derive(Clone)]
pub struct DurableQueue {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// `None` only while a failed store is being reopened.
    store: RwLock<Option<Arc<Store>>>,
    pub(crate) config: QueueConfig,
    metrics: Metrics,
    state: Mutex<State>,
    pushed: Arc<Notify>,
    /// Set after every applied write; cleared by whoever starts a flush.
    pub(crate) dirty: AtomicBool,
    /// Set when sled reported an error; the flusher then reopens the store.
    pub(crate) failed: AtomicBool,
    reopen_log: Mutex<DropLog>,
}

/// One open sled store. Dropped (closing its files) when the last in-flight
/// operation holding it ends.
pub(crate) struct Store {
    db: sled::Db,
    readings: sled::Tree,
    /// sled's log file, fdatasynced after each of sled's flushes: sled syncs
    /// it with `sync_file_range`, which leaves an appended tail's size and
    /// extents to the file system's next commit (up to 5 s on ext4), so a
    /// power cut lost acked readings (`tests/power_cut`).
    log: Arc<std::fs::File>,
}

impl Store {
    fn new(db: sled::Db, readings: sled::Tree, dir: &std::path::Path) -> Result<Store, QueueError> {
        let path = dir.join("db");
        let log = std::fs::File::open(&path).map_err(|e| QueueError::Open {
            dir: dir.to_path_buf(),
            source: sled::Error::Io(e),
        })?;
        Ok(Store {
            db,
            readings,
            log: Arc::new(log),
        })
    }
}

struct State {
    counts: Counts,
    /// Highest seq handed out (or found at open); new seqs are always above it.
    last_seq: u64,
    /// Pushed since the last successful flush (see `unflushed`).
    unflushed: Unflushed,
    /// The stored counts record is current: nothing was pushed since it was
    /// written, so a flush need not write it again.
    recorded: bool,
    full_log: DropLog,
}

/// One stored record chosen for eviction.
struct Victim {
    key: QueueKey,
    raw_key: sled::IVec,
    bytes: u64,
    readings: u64,
}

/// Seqs reserved for each record: its readings are `key seq + 0..n`, and the
/// next record's key starts past them (see `next_record_seq`).
const SEQS_PER_RECORD: u64 = 1 << 16;
const _: () = assert!(MAX_RECORD_READINGS as u64 <= SEQS_PER_RECORD);

/// One push's readings of one channel, encoded, before it has a key.
struct NewRecord {
    channel: ChannelId,
    readings: u64,
    value: Vec<u8>,
}

impl DurableQueue {
    /// Opens (or creates) the store in `config.dir`, quarantining a broken one.
    pub fn open(config: &QueueConfig, metrics: Metrics) -> Result<DurableQueue, QueueError> {
        Self::open_with_progress(config, metrics, &OpenProgress::new())
    }

    /// [`open`](Self::open), recording how far it got in `progress` (and
    /// logging a progress line every 30 s while that takes long).
    pub fn open_with_progress(
        config: &QueueConfig,
        metrics: Metrics,
        progress: &OpenProgress,
    ) -> Result<DurableQueue, QueueError> {
        config.validate()?;
        // Only here, not on every open: a move in this process opens the
        // fresh store while the old one is still aside.
        swap::recover_interrupted_swap(&config.dir).map_err(|e| QueueError::Open {
            dir: config.dir.clone(),
            source: sled::Error::Io(e),
        })?;
        let opened = open_or_quarantine(config, &metrics, progress)?;
        let queue = DurableQueue {
            inner: Arc::new(Inner {
                store: RwLock::new(Some(Arc::new(Store::new(
                    opened.db,
                    opened.readings,
                    &config.dir,
                )?))),
                config: config.clone(),
                metrics,
                state: Mutex::new(State {
                    counts: opened.counts,
                    last_seq: opened.max_seq,
                    unflushed: Unflushed::default(),
                    recorded: false,
                    full_log: DropLog::new(FULL_LOG_EVERY),
                }),
                pushed: Arc::new(Notify::new()),
                dirty: AtomicBool::new(false),
                failed: AtomicBool::new(false),
                reopen_log: Mutex::new(DropLog::new(REOPEN_LOG_EVERY)),
            }),
        };
        queue.update_count_gauges(&queue.lock().counts);
        queue.refresh_age_gauge();
        Ok(queue)
    }

    /// Stores `readings` in one atomic batch, dropping the oldest queued
    /// readings first if the batch would exceed `max_bytes`. The readings are
    /// durable after the next flush (within `flush_interval_ms`).
    pub fn push(&self, readings: &[Reading]) -> Result<(), QueueError> {
        if readings.is_empty() {
            return Ok(());
        }
        let records = records_of(readings);
        let batch_bytes: u64 = records
            .iter()
            .map(|r| (KEY_LEN + r.value.len()) as u64)
            .sum();
        let max_bytes = self.inner.config.max_bytes;
        if batch_bytes > max_bytes {
            return Err(QueueError::BatchTooLarge {
                readings: readings.len(),
                bytes: batch_bytes,
                max_bytes,
            });
        }

        // Lock first, then take the store: a reopen (which holds the lock)
        // never races a push still holding the old store.
        let mut state = self.lock();
        let store = self.store()?;
        let excess = (state.counts.total().bytes + batch_bytes).saturating_sub(max_bytes);
        let victims = if excess > 0 {
            self.oldest_victims(&store, &state.counts, excess)
                .map_err(self.failure("choosing readings to drop"))?
        } else {
            Vec::new()
        };

        let mut counts = state.counts.clone();
        for v in &victims {
            counts.sub(v.key.channel, v.readings, v.bytes);
        }
        let mut writes = Vec::with_capacity(records.len());
        for record in records {
            let key = QueueKey {
                channel: record.channel,
                seq: self.next_record_seq(&store, &mut state, record.readings)?,
            };
            counts.add(
                record.channel,
                record.readings,
                (KEY_LEN + record.value.len()) as u64,
            );
            writes.push((key, record));
        }
        self.write(&store, &victims, &writes, &counts, state.last_seq)?;
        state.counts = counts;
        state.recorded = !victims.is_empty();
        for v in &victims {
            state.unflushed.gone(v.key, v.readings);
        }
        for (key, record) in writes {
            state.unflushed.pushed(key, record.readings);
        }
        let dropped: u64 = victims.iter().map(|v| v.readings).sum();
        self.update_count_gauges(&state.counts);
        if dropped > 0 {
            self.inner
                .metrics
                .queue_dropped_total
                .with_label_values(&["full"])
                .inc_by(dropped);
            if let Some(n) = state.full_log.record(dropped, Instant::now()) {
                warn!(
                    dropped = n,
                    max_bytes,
                    "queue full (queue.max_bytes): dropped the oldest readings to make room"
                );
            }
        }
        drop(state);
        self.inner.pushed.notify_one();
        Ok(())
    }

    /// Stores one push: atomically, so a crash never keeps part of it.
    ///
    /// A push of one channel's readings is one record, one `insert` (atomic by
    /// itself); records of several channels go into one sled batch. Batches
    /// are not used for everything because sled 0.34 seals its log buffer for
    /// each one: measured with 100k one-reading pushes, batches ran at ~6,500
    /// pushes/s and wrote 3-12x the bytes per flush, inserts at ~70,000/s. A
    /// push that evicts readings is a removal, so it carries the counts record
    /// (see `occupancy`) and is always a batch.
    fn write(
        &self,
        store: &Store,
        victims: &[Victim],
        writes: &[(QueueKey, NewRecord)],
        counts: &Counts,
        covered_seq: u64,
    ) -> Result<(), QueueError> {
        if let ([], [(key, record)]) = (victims, writes) {
            store
                .readings
                .insert(encode_key(*key), record.value.as_slice())
                .map_err(self.failure("push"))?;
            self.inner.dirty.store(true, Ordering::Release);
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for v in victims {
            batch.remove(v.raw_key.clone());
        }
        for (key, record) in writes {
            batch.insert(&encode_key(*key)[..], record.value.as_slice());
        }
        if victims.is_empty() {
            store
                .readings
                .apply_batch(batch)
                .map_err(self.failure("push"))?;
            self.inner.dirty.store(true, Ordering::Release);
            return Ok(());
        }
        self.apply_with_counts(store, batch, counts, covered_seq, "push")
    }

    /// Applies a batch that removes readings together with the counts record
    /// describing the store after it, atomically: no removal survives a crash
    /// without the record that counts it (see `occupancy`).
    fn apply_with_counts(
        &self,
        store: &Store,
        mut batch: sled::Batch,
        counts: &Counts,
        covered_seq: u64,
        op: &'static str,
    ) -> Result<(), QueueError> {
        batch.insert(COUNTS_KEY, counts.encode(covered_seq));
        store
            .readings
            .apply_batch(batch)
            .map_err(self.failure(op))?;
        self.inner.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Readings currently queued.
    pub fn len(&self) -> u64 {
        self.lock().counts.total().readings
    }

    /// Encoded bytes (keys + values) currently queued; bounded by `max_bytes`.
    pub fn bytes(&self) -> u64 {
        self.lock().counts.total().bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `measured_at` of the reading that has been queued longest (lowest
    /// seq across channels), i.e. of the next reading the "full" policy would
    /// drop. This is the device's (or receive) time, not the enqueue time, so a
    /// device with a wrong clock shows up here. `None` when empty.
    pub fn oldest(&self) -> Option<DateTime<Utc>> {
        let store = self.store().ok()?;
        let channels = self.lock().counts.channels();
        let mut oldest: Option<(u64, sled::IVec)> = None;
        for channel in channels {
            // An error or undecodable entry is left to peek, which drops and counts it.
            let Some(Ok((k, v))) = store.readings.scan_prefix(channel_prefix(channel)).next()
            else {
                continue;
            };
            let Ok(key) = decode_key(&k) else { continue };
            match &oldest {
                Some((seq, _)) if *seq <= key.seq => {}
                _ => oldest = Some((key.seq, v)),
            }
        }
        oldest.and_then(|(_, v)| decode_measured_at(&v).ok())
    }

    /// Makes everything pushed so far durable.
    pub async fn flush(&self) -> Result<(), QueueError> {
        let store = self.store()?;
        self.inner.dirty.store(false, Ordering::Release);
        let mark = {
            // The record goes to disk with this flush, so after a crash
            // opening only has to count the pushes of one flush interval.
            let mut state = self.lock();
            if !state.recorded {
                let record = state.counts.encode(state.last_seq);
                if let Err(e) = store.readings.insert(COUNTS_KEY, record) {
                    self.inner.dirty.store(true, Ordering::Release);
                    return Err(self.failure("storing the queue counts")(e));
                }
                state.recorded = true;
            }
            state.last_seq
        };
        let synced = match store.db.flush_async().await {
            Ok(_) => {
                let log = store.log.clone();
                tokio::task::spawn_blocking(move || log.sync_data())
                    .await
                    .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())))
                    .map_err(sled::Error::Io)
            }
            Err(e) => Err(e),
        };
        match synced {
            Ok(()) => {
                self.lock().unflushed.flushed_through(mark);
                Ok(())
            }
            Err(e) => {
                self.inner.dirty.store(true, Ordering::Release);
                Err(self.failure("flush")(e))
            }
        }
    }

    /// Sets `queue_oldest_age_seconds` from [`DurableQueue::oldest`] (0 when empty).
    pub(crate) fn refresh_age_gauge(&self) {
        let age = self
            .oldest()
            .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.inner.metrics.queue_oldest_age_seconds.set(age);
    }

    fn update_count_gauges(&self, counts: &Counts) {
        let total = counts.total();
        let m = &self.inner.metrics;
        m.queue_readings
            .set(i64::try_from(total.readings).unwrap_or(i64::MAX));
        m.queue_bytes
            .set(i64::try_from(total.bytes).unwrap_or(i64::MAX));
    }

    /// The open store, or `Unavailable` while a failed one is being reopened.
    fn store(&self) -> Result<Arc<Store>, QueueError> {
        let slot = self
            .inner
            .store
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        slot.clone().ok_or_else(|| QueueError::Unavailable {
            dir: self.inner.config.dir.clone(),
        })
    }

    /// Maps a sled error of `op` and marks the store for reopening.
    fn failure(&self, op: &'static str) -> impl FnOnce(sled::Error) -> QueueError + '_ {
        move |source| {
            self.inner.failed.store(true, Ordering::Release);
            QueueError::Storage { op, source }
        }
    }

    /// True after a storage error, until [`DurableQueue::reopen_if_failed`] succeeds.
    pub(crate) fn has_failed(&self) -> bool {
        self.inner.failed.load(Ordering::Acquire)
    }

    /// Closes a failed store and opens it again (quarantining it if it no
    /// longer opens). Pushes and removals wait meanwhile. Returns
    /// whether the queue works again; on failure the flusher retries later.
    pub(crate) fn reopen_if_failed(&self) -> bool {
        if !self.has_failed() {
            return true;
        }
        let mut state = self.lock();
        // Close the failed store first: sled holds a file lock until every
        // handle is gone (an in-flight peek may delay that; then the open
        // below fails with "lock" and the next attempt succeeds).
        self.inner
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match open_or_quarantine(
            &self.inner.config,
            &self.inner.metrics,
            &OpenProgress::new(),
        ) {
            Ok(opened) => {
                self.count_lost_unflushed(&mut state, &opened.readings);
                let store = match Store::new(opened.db, opened.readings, &self.inner.config.dir) {
                    Ok(store) => store,
                    Err(e) => {
                        error!(error = %e, "reopened queue store has no log file");
                        return false;
                    }
                };
                state.counts = opened.counts;
                state.last_seq = state.last_seq.max(opened.max_seq);
                state.recorded = false;
                *self
                    .inner
                    .store
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(store));
                self.inner.failed.store(false, Ordering::Release);
                self.update_count_gauges(&state.counts);
                info!(
                    dir = %self.inner.config.dir.display(),
                    readings = state.counts.total().readings,
                    "queue store reopened after a storage error"
                );
                true
            }
            Err(e) => {
                let due = self
                    .inner
                    .reopen_log
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(1, Instant::now());
                if let Some(attempts) = due {
                    error!(error = %e, attempts, "queue store still unusable; retrying every flush interval");
                }
                false
            }
        }
    }

    /// Moves to a fresh store when the queue is empty and its files take more
    /// than `above` bytes, giving the disk back (see `swap`). Returns whether
    /// it moved. Pushes wait meanwhile; on an error the store is reopened by
    /// the flusher as after any storage error.
    pub fn return_space_if_drained(&self, above: u64) -> Result<bool, QueueError> {
        let mut state = self.lock();
        if state.counts.total().readings != 0 || self.has_failed() {
            return Ok(false);
        }
        let dir = self.inner.config.dir.clone();
        let used = swap::disk_usage(&dir);
        if used <= above {
            return Ok(false);
        }
        let old = self.store()?;
        // Its removals reach the disk first: a crash from here on finds
        // either this (empty) store or the fresh one.
        old.db
            .flush()
            .map_err(self.failure("flushing a drained store"))?;
        self.inner
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
        // From here on any error leaves the flusher to reopen whatever store
        // `dir` names (or a new one), as after any storage error.
        let fail = |e: QueueError| {
            self.inner.failed.store(true, Ordering::Release);
            e
        };
        swap::retire(&dir).map_err(|e| {
            fail(QueueError::Open {
                dir: dir.clone(),
                source: sled::Error::Io(e),
            })
        })?;
        let opened = open_or_quarantine(
            &self.inner.config,
            &self.inner.metrics,
            &OpenProgress::new(),
        )
        .map_err(fail)?;
        let store = Store::new(opened.db, opened.readings, &dir).map_err(fail)?;
        // The seqs handed out so far, so seqs keep growing after a restart.
        store
            .readings
            .insert(COUNTS_KEY, Counts::default().encode(state.last_seq))
            .and_then(|_| store.db.flush())
            .and_then(|_| store.log.sync_data().map_err(sled::Error::Io))
            .and_then(|_| swap::mark_complete(&dir).map_err(sled::Error::Io))
            .map_err(|source| {
                fail(QueueError::Open {
                    dir: dir.clone(),
                    source,
                })
            })?;
        swap::delete_retired(&dir);
        state.counts = opened.counts;
        state.last_seq = state.last_seq.max(opened.max_seq);
        state.recorded = true;
        state.unflushed = Unflushed::default();
        *self
            .inner
            .store
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(store));
        self.update_count_gauges(&state.counts);
        info!(
            dir = %dir.display(),
            before = used,
            after = swap::disk_usage(&dir),
            "queue drained: moved to a fresh store to give its disk space back"
        );
        Ok(true)
    }

    /// After a storage error, the readings pushed since the last successful
    /// flush that the reopened store does not have were lost with the failed
    /// flush: count and log them as `write_error` drops.
    fn count_lost_unflushed(&self, state: &mut State, reopened: &sled::Tree) {
        let candidates = state.unflushed.take();
        let mut per_channel = std::collections::BTreeMap::<u64, u64>::new();
        let mut lost = 0;
        // A read error counts the readings as lost: they cannot be delivered either.
        for (key, readings) in candidates {
            if !matches!(reopened.contains_key(encode_key(key)), Ok(true)) {
                *per_channel.entry(key.channel.get()).or_default() += readings;
                lost += readings;
            }
        }
        if lost == 0 {
            return;
        }
        self.inner
            .metrics
            .queue_dropped_total
            .with_label_values(&["write_error"])
            .inc_by(lost);
        error!(
            lost,
            ?per_channel,
            dir = %self.inner.config.dir.display(),
            "readings accepted since the last successful queue flush were lost when the disk failed"
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; if one ever did, the
        // counts are still usable (at worst off by one batch), so keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The key seq of a new record of `readings` readings, reserving the seqs
    /// of its readings: above every seq ever handed out, also across restarts.
    /// sled's persisted id generator survives crashes (it skips ahead on
    /// recovery) and each id owns [`SEQS_PER_RECORD`] seqs; `last_seq`
    /// (seeded with the highest stored key) guards against ever going back,
    /// also into a store of one-reading entries written before records.
    fn next_record_seq(
        &self,
        store: &Store,
        state: &mut State,
        readings: u64,
    ) -> Result<u64, QueueError> {
        let id = store
            .db
            .generate_id()
            .map_err(self.failure("generating a sequence number"))?;
        // 2^48 ids at 1 million records a second last nine years; saturating
        // keeps even that ordered.
        let after_last = (state.last_seq / SEQS_PER_RECORD)
            .saturating_add(1)
            .saturating_mul(SEQS_PER_RECORD);
        let seq = id.saturating_mul(SEQS_PER_RECORD).max(after_last);
        state.last_seq = seq.saturating_add(readings.saturating_sub(1));
        Ok(seq)
    }

    /// The globally oldest records (lowest seq across all channels) whose
    /// stored size adds up to at least `need` bytes: a k-way merge over the
    /// channels' prefix scans, so only the heads are read. Whole records go:
    /// a record holds one push, so this drops at most one push's worth more
    /// than needed.
    fn oldest_victims(
        &self,
        store: &Store,
        counts: &Counts,
        need: u64,
    ) -> Result<Vec<Victim>, sled::Error> {
        let mut iters: Vec<sled::Iter> = counts
            .channels()
            .into_iter()
            .map(|ch| store.readings.scan_prefix(channel_prefix(ch)))
            .collect();
        let mut heap = BinaryHeap::new();
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(item) = it.next() {
                let (k, v) = item?;
                heap.push(Reverse(head(i, k, &v)));
            }
        }
        let mut victims = Vec::new();
        let mut freed = 0;
        while freed < need {
            let Some(Reverse(h)) = heap.pop() else { break };
            if let Some(key) = h.key {
                freed += h.bytes;
                victims.push(Victim {
                    key,
                    raw_key: h.raw_key,
                    bytes: h.bytes,
                    readings: h.readings,
                });
            }
            if let Some(item) = iters.get_mut(h.iter).and_then(Iterator::next) {
                let (k, v) = item?;
                heap.push(Reverse(head(h.iter, k, &v)));
            }
        }
        Ok(victims)
    }

    /// Removes records that failed to decode (a checksum that does not match,
    /// a layout this build does not know), counting the readings each says it
    /// held and logging each. The rest of the channel still drains.
    fn drop_corrupt(&self, entries: Vec<(sled::IVec, String)>) {
        let mut state = self.lock();
        let Ok(store) = self.store() else { return };
        let mut batch = sled::Batch::default();
        let mut counts = state.counts.clone();
        let mut removed = 0;
        let mut touched = false;
        for (raw_key, reason) in entries {
            match store.readings.get(&raw_key) {
                Ok(Some(v)) => {
                    let key = decode_key(&raw_key).ok();
                    let readings = claimed_len(&v);
                    error!(
                        channel = key.map(|k| k.channel.get()),
                        seq = key.map(|k| k.seq),
                        readings,
                        %reason,
                        "dropping a queued record that cannot be decoded"
                    );
                    if let Some(key) = key {
                        // Never more than the channel holds: the count itself
                        // may be what is damaged.
                        let readings = readings.min(counts.of(key.channel).readings);
                        counts.sub(key.channel, readings, (raw_key.len() + v.len()) as u64);
                        state.unflushed.gone(key, readings);
                        removed += readings;
                    }
                    batch.remove(raw_key);
                    touched = true;
                }
                Ok(None) => {}
                Err(e) => error!(error = %e, "reading a corrupt queue entry failed"),
            }
        }
        if !touched {
            return;
        }
        if let Err(e) = self.apply_with_counts(
            &store,
            batch,
            &counts,
            state.last_seq,
            "removing corrupt entries",
        ) {
            error!(error = %e, "removing corrupt queue entries failed");
            return;
        }
        state.counts = counts;
        state.recorded = true;
        self.update_count_gauges(&state.counts);
        self.inner
            .metrics
            .queue_dropped_total
            .with_label_values(&["corrupt"])
            .inc_by(removed);
    }

    fn peek_inner(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, QueueError> {
        let mut out = Vec::with_capacity(max.min(1024));
        let store = self.store()?;
        let mut corrupt = Vec::new();
        for item in store.readings.scan_prefix(channel_prefix(channel)) {
            if out.len() >= max {
                break;
            }
            let (k, v) = item.map_err(self.failure("peek"))?;
            match decode_key(&k).and_then(|key| decode_record(key, &v)) {
                Ok(entries) => {
                    let room = max - out.len();
                    out.extend(
                        entries
                            .into_iter()
                            .take(room)
                            .map(|(key, reading)| Queued { key, reading }),
                    );
                }
                Err(e) => corrupt.push((k, e.to_string())),
            }
        }
        if !corrupt.is_empty() {
            self.drop_corrupt(corrupt);
        }
        Ok(out)
    }

    /// Removes `keys` (those still stored) all or nothing across a crash, with
    /// single operations behind an intent record rather than a sled batch, so
    /// that the removal waits for the next flush instead of costing its own
    /// log writes (see `intent`).
    fn remove_inner(&self, keys: &[QueueKey]) -> Result<(), QueueError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut state = self.lock();
        let store = self.store()?;
        let tree = &store.readings;
        let mut counts = state.counts.clone();
        let removal = intent::removal(tree, keys, &mut counts).map_err(self.failure("remove"))?;
        if removal.records.is_empty() {
            return Ok(());
        }
        let counts_record = counts.encode(state.last_seq);
        let records = removal.records.clone();
        tree.insert(INTENT_KEY, intent::encode(keys, &counts_record))
            .map_err(self.failure("remove"))?;
        removal.apply_singly(tree).map_err(self.failure("remove"))?;
        tree.insert(COUNTS_KEY, counts_record)
            .map_err(self.failure("remove"))?;
        tree.remove(INTENT_KEY).map_err(self.failure("remove"))?;
        self.inner.dirty.store(true, Ordering::Release);
        state.counts = counts;
        state.recorded = true;
        for (key, readings) in records {
            state.unflushed.gone(key, readings);
        }
        self.update_count_gauges(&state.counts);
        Ok(())
    }
}

/// The current head of one channel's scan in the eviction merge. Ordered by
/// seq first, so the heap yields the globally oldest.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Head {
    seq: u64,
    iter: usize,
    /// `None` for a key that does not decode. Cannot happen (open drops such
    /// keys, push writes valid ones); skipped rather than trusted.
    key: Option<QueueKey>,
    raw_key: sled::IVec,
    bytes: u64,
    readings: u64,
}

fn head(iter: usize, raw_key: sled::IVec, value: &[u8]) -> Head {
    let key = decode_key(&raw_key).ok();
    Head {
        seq: key.map_or(0, |k| k.seq),
        iter,
        key,
        bytes: (raw_key.len() + value.len()) as u64,
        // A damaged record is evicted for what it says it held.
        readings: record_len(value).unwrap_or_else(|_| claimed_len(value)),
        raw_key,
    }
}

/// A push's readings as records: one per channel (in arrival order), split
/// at [`MAX_RECORD_READINGS`].
fn records_of(readings: &[Reading]) -> Vec<NewRecord> {
    let mut by_channel: Vec<(ChannelId, Vec<&Reading>)> = Vec::new();
    for reading in readings {
        match by_channel.iter_mut().find(|(c, _)| *c == reading.channel) {
            Some((_, group)) => group.push(reading),
            None => by_channel.push((reading.channel, vec![reading])),
        }
    }
    let mut records = Vec::new();
    for (channel, group) in by_channel {
        for chunk in group.chunks(MAX_RECORD_READINGS) {
            // Offsets from the record's key seq: the queue hands out
            // consecutive seqs to a record's readings.
            let entries = chunk.iter().enumerate().map(|(i, r)| (i as u64, *r));
            records.push(NewRecord {
                channel,
                readings: chunk.len() as u64,
                value: encode_record(0, entries),
            });
        }
    }
    records
}

impl Drop for Store {
    /// Last line of defence for a clean shutdown that skipped the flusher.
    fn drop(&mut self) {
        if let Err(e) = self.db.flush() {
            error!(error = %e, "final queue flush failed");
        }
    }
}

impl ReadingStore for DurableQueue {
    fn channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        Ok(self.lock().counts.channels())
    }

    fn len_of(&self, channel: ChannelId) -> Result<u64, StoreError> {
        Ok(self.lock().counts.of(channel).readings)
    }

    fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError> {
        self.peek_inner(channel, max)
            .map_err(|e| StoreError(e.to_string()))
    }

    fn remove(&self, keys: &[QueueKey]) -> Result<(), StoreError> {
        self.remove_inner(keys)
            .map_err(|e| StoreError(e.to_string()))
    }

    fn pushed(&self) -> Arc<Notify> {
        self.inner.pushed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::REMOVE_CHUNK;
    use tsgw_core::{Field, Origin, SourceKind, Target, Value};

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    fn reading(channel: u64, n: f64) -> Reading {
        Reading {
            channel: ch(channel),
            target: Target::Field(Field::new(1).unwrap()),
            value: Value::Number(n),
            measured_at: DateTime::from_timestamp(1_764_000_000 + n as i64, 0).unwrap(),
            origin: Origin::new(SourceKind::Serial, "arduino"),
        }
    }

    fn open(dir: &std::path::Path, max_bytes: u64) -> (DurableQueue, Metrics) {
        let metrics = Metrics::new();
        let config = QueueConfig {
            dir: dir.join("q"),
            max_bytes,
            ..QueueConfig::default()
        };
        (
            DurableQueue::open(&config, metrics.clone()).unwrap(),
            metrics,
        )
    }

    fn values(q: &DurableQueue, channel: u64) -> Vec<f64> {
        q.peek(ch(channel), usize::MAX)
            .unwrap()
            .into_iter()
            .filter_map(|q| q.reading.value.as_f64())
            .collect()
    }

    #[test]
    fn each_channel_drains_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, metrics) = open(tmp.path(), 1 << 20);
        q.push(&[reading(2, 1.0), reading(1, 2.0)]).unwrap();
        q.push(&[reading(2, 3.0)]).unwrap();
        q.push(&[reading(1, 4.0), reading(2, 5.0)]).unwrap();
        assert_eq!(q.channels().unwrap(), vec![ch(1), ch(2)]);
        assert_eq!(values(&q, 1), vec![2.0, 4.0]);
        assert_eq!(values(&q, 2), vec![1.0, 3.0, 5.0]);
        assert_eq!(q.len(), 5);
        assert_eq!(metrics.queue_readings.get(), 5);

        let first_two = q.peek(ch(2), 2).unwrap();
        assert_eq!(first_two.len(), 2);
        assert!(first_two[0].key.seq < first_two[1].key.seq);
        assert_eq!(first_two[0].reading, reading(2, 1.0));
        q.remove(&[first_two[0].key, first_two[1].key]).unwrap();
        // Removing again (e.g. a retried confirmation) is harmless.
        q.remove(&[first_two[0].key]).unwrap();
        assert_eq!(values(&q, 2), vec![5.0]);
        assert_eq!(q.len(), 3);

        let rest: Vec<QueueKey> = [1, 2]
            .iter()
            .flat_map(|c| q.peek(ch(*c), 10).unwrap())
            .map(|q| q.key)
            .collect();
        q.remove(&rest).unwrap();
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
        assert!(q.channels().unwrap().is_empty());
        assert_eq!(q.oldest(), None);
        assert_eq!(metrics.queue_bytes.get(), 0);
    }

    #[test]
    fn oldest_is_measured_at_of_longest_queued_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, _) = open(tmp.path(), 1 << 20);
        q.push(&[reading(5, 30.0)]).unwrap();
        q.push(&[reading(3, 10.0)]).unwrap();
        // Channel 3 sorts first, but channel 5's reading was queued first.
        assert_eq!(q.oldest(), Some(reading(5, 30.0).measured_at));
    }

    #[test]
    fn full_queue_drops_globally_oldest_and_stays_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let per_reading = crate::codec::single_reading_len(&reading(1, 0.0)) as u64;
        let max = 10 * per_reading;
        let (q, metrics) = open(tmp.path(), 1024.max(max));
        let capacity = q.inner.config.max_bytes / per_reading;
        // Alternate channels so "oldest" must be decided across channels.
        for i in 0..capacity + 5 {
            q.push(&[reading(1 + i % 2, i as f64)]).unwrap();
            assert!(q.bytes() <= q.inner.config.max_bytes);
        }
        assert_eq!(q.len(), capacity);
        let dropped = metrics
            .queue_dropped_total
            .with_label_values(&["full"])
            .get();
        assert_eq!(dropped, 5);
        let mut kept: Vec<f64> = values(&q, 1).into_iter().chain(values(&q, 2)).collect();
        kept.sort_by(f64::total_cmp);
        let expected: Vec<f64> = (5..capacity + 5).map(|i| i as f64).collect();
        assert_eq!(kept, expected);
        assert_eq!(metrics.queue_bytes.get() as u64, q.bytes());
    }

    #[test]
    fn batch_larger_than_the_bound_is_refused_without_dropping() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, _) = open(tmp.path(), 1024);
        q.push(&[reading(1, 0.0)]).unwrap();
        let big: Vec<Reading> = (0..300).map(|i| reading(1, i as f64)).collect();
        let err = q.push(&big).unwrap_err();
        assert!(
            matches!(err, QueueError::BatchTooLarge { readings: 300, .. }),
            "{err}"
        );
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn corrupt_value_is_dropped_counted_and_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, metrics) = open(tmp.path(), 1 << 20);
        q.push(&[reading(1, 1.0)]).unwrap();
        let bad_key = encode_key(QueueKey {
            channel: ch(1),
            seq: q.lock().last_seq + 1,
        });
        // Simulate a damaged value between two good ones, counted like a real entry.
        q.store()
            .unwrap()
            .readings
            .insert(bad_key, &[7u8, 1, 2][..])
            .unwrap();
        q.lock().counts.add(ch(1), 1, (KEY_LEN + 3) as u64);
        q.lock().last_seq += 1;
        q.push(&[reading(1, 2.0)]).unwrap();
        assert_eq!(q.len(), 3);

        assert_eq!(values(&q, 1), vec![1.0, 2.0]);
        assert_eq!(
            metrics
                .queue_dropped_total
                .with_label_values(&["corrupt"])
                .get(),
            1
        );
        assert_eq!(q.len(), 2);
        assert_eq!(q.store().unwrap().readings.get(bad_key).unwrap(), None);
    }

    #[test]
    fn push_wakes_the_consumer() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, _) = open(tmp.path(), 1 << 20);
        let notify = q.pushed();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        q.push(&[reading(1, 1.0)]).unwrap();
        // notify_one stores a permit, so a consumer that was busy still wakes.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), notify.notified())
                .await
                .expect("push did not notify")
        });
    }

    #[test]
    fn reopen_keeps_readings_counts_and_seq_order() {
        let tmp = tempfile::tempdir().unwrap();
        let last_seq;
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            q.push(&[reading(1, 1.0), reading(2, 2.0)]).unwrap();
            last_seq = q.peek(ch(2), 1).unwrap()[0].key.seq;
            // Dropping the last handle flushes.
        }
        let (q, metrics) = open(tmp.path(), 1 << 20);
        assert_eq!(q.len(), 2);
        assert_eq!(metrics.queue_readings.get(), 2);
        q.push(&[reading(2, 3.0)]).unwrap();
        let keys: Vec<u64> = q
            .peek(ch(2), 10)
            .unwrap()
            .iter()
            .map(|q| q.key.seq)
            .collect();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], last_seq);
        assert!(keys[1] > last_seq);
        assert_eq!(values(&q, 2), vec![2.0, 3.0]);
    }

    #[test]
    fn seqs_keep_growing_after_a_drained_queue_is_reopened() {
        let tmp = tempfile::tempdir().unwrap();
        let first_seq;
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            q.push(&[reading(1, 1.0)]).unwrap();
            let queued = q.peek(ch(1), 1).unwrap();
            first_seq = queued[0].key.seq;
            q.remove(&[queued[0].key]).unwrap();
            assert!(q.is_empty());
        }
        let (q, _) = open(tmp.path(), 1 << 20);
        q.push(&[reading(1, 2.0)]).unwrap();
        let again = q.peek(ch(1), 1).unwrap()[0].key.seq;
        assert!(again > first_seq, "{again} <= {first_seq}");
    }

    #[test]
    fn corrupt_value_found_after_a_restart_is_dropped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            q.push(&[reading(1, 1.0), reading(1, 2.0)]).unwrap();
            q.push(&[reading(1, 3.0)]).unwrap();
            let first = q.peek(ch(1), 1).unwrap()[0].key;
            // Damage the first record on disk: one flipped bit in its last reading.
            let store = q.store().unwrap();
            let mut value = store
                .readings
                .get(encode_key(first))
                .unwrap()
                .unwrap()
                .to_vec();
            *value.last_mut().unwrap() ^= 0x10;
            store.readings.insert(encode_key(first), value).unwrap();
        }
        // The records were pushed after the last counts record, so open
        // counts them, and the checksum catches the damage there: the
        // record's two readings are dropped and counted before anything drains.
        let (q, metrics) = open(tmp.path(), 1 << 20);
        assert_eq!(q.len(), 1);
        assert_eq!(values(&q, 1), vec![3.0]);
        assert_eq!(
            metrics
                .queue_dropped_total
                .with_label_values(&["corrupt"])
                .get(),
            2
        );
        assert_eq!(q.len(), 1);
        assert_eq!(metrics.queue_readings.get(), 1);
    }

    #[test]
    fn a_store_of_one_reading_entries_is_upgraded_and_drains() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        {
            // What the first release wrote: marker /1, one version-1 value per key.
            let db = sled::open(&dir).unwrap();
            db.insert(b"tsgw-queue-format", b"tsgw-queue/1").unwrap();
            let tree = db.open_tree(b"readings").unwrap();
            let mut legacy = vec![1u8, 1];
            legacy.extend_from_slice(&[0x80, 0xb8, 0xd9, 0xcd, 0x0d]); // zigzag(1_764_000_000)
            legacy.push(0); // nanos
            legacy.push(0);
            legacy.extend_from_slice(&7.5f64.to_le_bytes());
            legacy.push(1);
            legacy.extend_from_slice(&[3, b'o', b'l', b'd']);
            tree.insert(
                encode_key(QueueKey {
                    channel: ch(1),
                    seq: 5,
                }),
                legacy,
            )
            .unwrap();
            db.flush().unwrap();
        }
        let (q, _) = open(tmp.path(), 1 << 20);
        assert_eq!(q.len(), 1);
        q.push(&[reading(1, 8.0), reading(1, 9.0)]).unwrap();
        let queued = q.peek(ch(1), 10).unwrap();
        let got: Vec<(u64, f64)> = queued
            .iter()
            .map(|q| (q.key.seq, q.reading.value.as_f64().unwrap()))
            .collect();
        assert_eq!(got[0], (5, 7.5));
        assert_eq!(queued[0].reading.origin.device, "old");
        assert_eq!(
            got.iter().map(|g| g.1).collect::<Vec<_>>(),
            vec![7.5, 8.0, 9.0]
        );
        assert!(got[1].0 > 5 && got[2].0 == got[1].0 + 1, "{got:?}");
        let marker = q
            .inner
            .store
            .read()
            .unwrap()
            .as_ref()
            .unwrap()
            .db
            .get(b"tsgw-queue-format");
        assert_eq!(marker.unwrap().unwrap().as_ref(), b"tsgw-queue/2");
    }

    #[test]
    fn removing_part_of_a_record_keeps_the_rest_across_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let batch: Vec<Reading> = (0..10).map(|i| reading(1, i as f64)).collect();
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            q.push(&batch).unwrap();
            let queued = q.peek(ch(1), 10).unwrap();
            // The middle and the first go; the rest stay under the record's key.
            let gone: Vec<QueueKey> = [0, 4, 5].iter().map(|&i| queued[i].key).collect();
            q.remove(&gone).unwrap();
            assert_eq!(values(&q, 1), vec![1.0, 2.0, 3.0, 6.0, 7.0, 8.0, 9.0]);
            assert_eq!(q.len(), 7);
            let before = q.bytes();
            q.remove(&[queued[1].key]).unwrap();
            assert!(q.bytes() < before);
            assert_eq!(counted_by_scan(&q), q.lock().counts);
        }
        let (q, _) = open(tmp.path(), 1 << 20);
        assert_eq!(values(&q, 1), vec![2.0, 3.0, 6.0, 7.0, 8.0, 9.0]);
        assert_eq!(counted_by_scan(&q), q.lock().counts);
        let all: Vec<QueueKey> = q.peek(ch(1), 100).unwrap().iter().map(|q| q.key).collect();
        q.remove(&all).unwrap();
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_drained_store_gives_its_space_back_and_seqs_keep_growing() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, metrics) = open(tmp.path(), 64 << 20);
        let dir = q.inner.config.dir.clone();
        for i in 0..200 {
            let batch: Vec<Reading> = (0..500).map(|j| reading(1, (i * 500 + j) as f64)).collect();
            q.push(&batch).unwrap();
        }
        let keys: Vec<QueueKey> = q
            .peek(ch(1), usize::MAX)
            .unwrap()
            .iter()
            .map(|q| q.key)
            .collect();
        let last_seq = keys.last().unwrap().seq;
        // Not drained: nothing moves.
        assert!(!q.return_space_if_drained(1 << 20).unwrap());
        q.remove(&keys).unwrap();
        let before = swap::disk_usage(&dir);
        assert!(before > 2 << 20, "{before}");
        assert!(q.return_space_if_drained(1 << 20).unwrap());
        let after = swap::disk_usage(&dir);
        assert!(after < 1 << 20, "{before} -> {after}");
        assert!(!q.return_space_if_drained(1 << 20).unwrap());
        // The queue works on, and after a restart seqs still only grow.
        q.push(&[reading(1, 1.0)]).unwrap();
        assert!(q.peek(ch(1), 1).unwrap()[0].key.seq > last_seq);
        assert_eq!(metrics.queue_readings.get(), 1);
        drop(q);
        let (q, _) = open(tmp.path(), 64 << 20);
        let all: Vec<QueueKey> = q.peek(ch(1), 10).unwrap().iter().map(|q| q.key).collect();
        assert_eq!(all.len(), 1);
        q.remove(&all).unwrap();
        assert!(q.return_space_if_drained(0).unwrap());
        drop(q);
        let (q, _) = open(tmp.path(), 64 << 20);
        q.push(&[reading(1, 2.0)]).unwrap();
        assert!(q.peek(ch(1), 1).unwrap()[0].key.seq > all[0].seq);
    }

    #[test]
    fn readings_the_store_lost_behind_the_counts_record_are_counted_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            q.push(&(0..5).map(|i| reading(1, i as f64)).collect::<Vec<_>>())
                .unwrap();
            q.push(&(0..3).map(|i| reading(2, i as f64)).collect::<Vec<_>>())
                .unwrap();
            q.push(&[reading(1, 9.0)]).unwrap();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(q.flush())
                .unwrap();
            // What a damaged log recovers: the counts record, without a record it counts.
            let first = q.peek(ch(1), 1).unwrap()[0].key;
            q.store()
                .unwrap()
                .readings
                .remove(encode_key(first))
                .unwrap();
        }
        let (q, metrics) = open(tmp.path(), 1 << 20);
        let lost = metrics
            .queue_dropped_total
            .with_label_values(&["lost_in_storage"]);
        assert_eq!(lost.get(), 5);
        assert_eq!(q.len(), 4);
        assert_eq!(values(&q, 1), vec![9.0]);
        assert_eq!(counted_by_scan(&q), q.lock().counts);
        drop(q);
        // Counted once: the next open agrees with the fresh record.
        let (_, metrics) = open(tmp.path(), 1 << 20);
        let lost = metrics
            .queue_dropped_total
            .with_label_values(&["lost_in_storage"]);
        assert_eq!(lost.get(), 0);
    }

    fn dropped(metrics: &Metrics, reason: &str) -> f64 {
        metrics
            .queue_dropped_total
            .with_label_values(&[reason])
            .get() as f64
    }

    /// Per-channel readings and bytes by reading every entry, to check the record.
    fn counted_by_scan(q: &DurableQueue) -> Counts {
        let mut counts = Counts::default();
        for item in q.store().unwrap().readings.iter() {
            let (k, v) = item.unwrap();
            if let Ok(key) = decode_key(&k) {
                counts.add(
                    key.channel,
                    record_len(&v).unwrap(),
                    (k.len() + v.len()) as u64,
                );
            }
        }
        counts
    }

    #[test]
    fn the_counts_record_follows_pushes_removals_and_evictions() {
        let tmp = tempfile::tempdir().unwrap();
        let expected;
        {
            let (q, _) = open(tmp.path(), 4096);
            for n in 0..200 {
                q.push(&[reading(1 + n % 3, n as f64)]).unwrap();
            }
            q.push(&[reading(4, 1.0), reading(4, 2.0), reading(5, 3.0)])
                .unwrap();
            let head: Vec<_> = q.peek(ch(2), 5).unwrap().iter().map(|r| r.key).collect();
            q.remove(&head).unwrap();
            let one = q.peek(ch(4), 1).unwrap()[0].key;
            q.remove(&[one]).unwrap();
            expected = counted_by_scan(&q);
            assert_eq!(q.lock().counts, expected);
        }
        let (q, _) = open(tmp.path(), 4096);
        let stored = q
            .store()
            .unwrap()
            .readings
            .get(COUNTS_KEY)
            .unwrap()
            .unwrap();
        assert_eq!(Counts::decode(&stored).unwrap().0, expected);
        assert_eq!(q.lock().counts, expected);
        assert!(!q.is_empty());
    }

    #[test]
    fn opening_reports_its_progress() {
        let tmp = tempfile::tempdir().unwrap();
        let config = QueueConfig {
            dir: tmp.path().join("q"),
            ..QueueConfig::default()
        };
        {
            let q = DurableQueue::open(&config, Metrics::new()).unwrap();
            q.push(&[reading(1, 1.0), reading(2, 2.0), reading(2, 3.0)])
                .unwrap();
            // Without a counts record the open counts by a full scan.
            q.store().unwrap().readings.remove(COUNTS_KEY).unwrap();
        }
        let progress = OpenProgress::new();
        assert_eq!(progress.state().phase, crate::OpenPhase::NotStarted);
        let q = DurableQueue::open_with_progress(&config, Metrics::new(), &progress).unwrap();
        let state = progress.state();
        assert_eq!(state.phase, crate::OpenPhase::Open);
        assert_eq!(state.items, 3, "the scan counted every reading");
        assert_eq!(
            state.expected, None,
            "no counts record: no total to count down"
        );
        assert_eq!(q.len(), 3);
        drop(q);
        // The open stored a counts record: the next one knows the total.
        let progress = OpenProgress::new();
        let _q = DurableQueue::open_with_progress(&config, Metrics::new(), &progress).unwrap();
        let state = progress.state();
        assert_eq!((state.items, state.expected), (3, Some(3)));
        assert_eq!(state.left(), Some(0));
    }

    #[test]
    fn a_store_without_a_true_record_is_counted_by_a_scan() {
        let tmp = tempfile::tempdir().unwrap();
        let expected;
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            q.push(&[reading(1, 1.0), reading(2, 2.0), reading(2, 3.0)])
                .unwrap();
            expected = counted_by_scan(&q);
            // As written by a version before the record existed.
            q.store().unwrap().readings.remove(COUNTS_KEY).unwrap();
        }
        {
            let (q, _) = open(tmp.path(), 1 << 20);
            assert_eq!(q.lock().counts, expected);
            // A record that forgot a channel (channel 2 is missing).
            let mut wrong = Counts::default();
            wrong.add(ch(1), 1, 49);
            q.store()
                .unwrap()
                .readings
                .insert(COUNTS_KEY, wrong.encode(u64::MAX))
                .unwrap();
        }
        let (q, _) = open(tmp.path(), 1 << 20);
        assert_eq!(q.lock().counts, expected);
        assert_eq!(values(&q, 2), vec![2.0, 3.0]);
    }

    #[test]
    fn a_large_removal_leaves_no_intent() {
        let tmp = tempfile::tempdir().unwrap();
        let (q, _) = open(tmp.path(), 1 << 24);
        let batch: Vec<Reading> = (0..2 * REMOVE_CHUNK + 10)
            .map(|n| reading(1 + (n % 2) as u64, n as f64))
            .collect();
        q.push(&batch).unwrap();
        let mut keys: Vec<QueueKey> = q
            .peek(ch(1), usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.key)
            .collect();
        keys.extend(q.peek(ch(2), 7).unwrap().iter().map(|r| r.key));
        assert!(keys.len() > REMOVE_CHUNK);
        q.remove(&keys).unwrap();
        assert_eq!(q.len(), (REMOVE_CHUNK + 5 - 7) as u64);
        assert_eq!(q.lock().counts, counted_by_scan(&q));
        let store = q.store().unwrap();
        assert_eq!(store.readings.get(INTENT_KEY).unwrap(), None);
        assert!(q.peek(ch(1), 1).unwrap().is_empty());
    }

    /// The store as an older build left it when a crash interrupted a
    /// chunked removal: a version 1 intent, and the first chunk (here two
    /// keys) removed in a batch with its counts record.
    #[test]
    fn an_older_builds_interrupted_removal_is_finished_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let doomed: Vec<QueueKey>;
        {
            let (q, _) = open(tmp.path(), 1 << 24);
            let batch: Vec<Reading> = (0..30).map(|n| reading(1 + n % 3, n as f64)).collect();
            q.push(&batch).unwrap();
            doomed = q.peek(ch(2), 6).unwrap().iter().map(|r| r.key).collect();
            let store = q.store().unwrap();
            store
                .readings
                .insert(INTENT_KEY, intent::encode_chunked(&doomed))
                .unwrap();
            let mut state = q.lock();
            let mut counts = state.counts.clone();
            let removal = intent::removal(&store.readings, &doomed[..2], &mut counts).unwrap();
            let mut batch = removal.into_batch();
            batch.insert(COUNTS_KEY, counts.encode(state.last_seq));
            store.readings.apply_batch(batch).unwrap();
            state.counts = counts;
        }
        let (q, metrics) = open(tmp.path(), 1 << 24);
        assert_eq!(q.len(), 24);
        assert_eq!(q.lock().counts, counted_by_scan(&q));
        let left: Vec<QueueKey> = q
            .peek(ch(2), usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.key)
            .collect();
        assert_eq!(left.len(), 4);
        assert!(left.iter().all(|k| !doomed.contains(k)));
        assert_eq!(q.store().unwrap().readings.get(INTENT_KEY).unwrap(), None);
        assert_eq!(dropped(&metrics, "lost_in_storage"), 0.0);
    }

    /// Every prefix of a removal's operations (intent, record operations,
    /// counts record, intent deleted), as sled recovers after a crash: the
    /// store opens with all of the removal or none of it, exact counts, and
    /// nothing counted as lost in storage.
    #[test]
    fn a_removal_cut_after_any_of_its_operations_opens_whole() {
        for cut in 0..=4 {
            let tmp = tempfile::tempdir().unwrap();
            let doomed: Vec<QueueKey>;
            {
                let (q, _) = open(tmp.path(), 1 << 24);
                // Three pushes of channel 2, so the removal touches three
                // records (one rewritten: it keeps a reading).
                for push in 0..3 {
                    let batch: Vec<Reading> =
                        (0..3).map(|n| reading(2, (push * 3 + n) as f64)).collect();
                    q.push(&batch).unwrap();
                }
                q.push(&[reading(1, 99.0)]).unwrap();
                doomed = q.peek(ch(2), 8).unwrap().iter().map(|r| r.key).collect();
                let store = q.store().unwrap();
                let tree = &store.readings;
                let state = q.lock();
                let mut counts = state.counts.clone();
                let removal = intent::removal(tree, &doomed, &mut counts).unwrap();
                let record = counts.encode(state.last_seq);
                if cut >= 1 {
                    tree.insert(INTENT_KEY, intent::encode(&doomed, &record))
                        .unwrap();
                }
                if cut == 2 {
                    // Only the first record operation made it.
                    let first = intent::removal(tree, &doomed[..3], &mut counts.clone()).unwrap();
                    first.apply_singly(tree).unwrap();
                } else if cut >= 3 {
                    removal.apply_singly(tree).unwrap();
                }
                if cut >= 4 {
                    tree.insert(COUNTS_KEY, record).unwrap();
                }
                drop(state);
            }
            let (q, metrics) = open(tmp.path(), 1 << 24);
            let expected_left = if cut == 0 { 9 } else { 1 };
            assert_eq!(q.len_of(ch(2)).unwrap(), expected_left, "cut {cut}");
            assert_eq!(q.len(), expected_left + 1, "cut {cut}");
            assert_eq!(q.lock().counts, counted_by_scan(&q), "cut {cut}");
            assert_eq!(dropped(&metrics, "lost_in_storage"), 0.0, "cut {cut}");
            assert_eq!(q.store().unwrap().readings.get(INTENT_KEY).unwrap(), None);
            if cut > 0 {
                assert_eq!(values(&q, 2), vec![8.0], "cut {cut}");
            }
        }
    }
}
