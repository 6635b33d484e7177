//! Opening the store, and moving a broken one aside instead of crash-looping.
//!
//! A store is "broken" when its content is the problem: sled reports
//! corruption or an unsupported layout, panics while recovering, the path is
//! not a directory, the format marker is missing or unknown, or the first scan
//! cannot read it. Then the directory is renamed to `<dir>.corrupt-<unix-time>`
//! (kept for a post-mortem, never deleted), `tsgw_queue_quarantined_total` is
//! incremented, an `error!` is logged and a clean store is started: the gateway
//! comes back up by itself after a power cut.
//!
//! Causes outside the store (permission denied, another process holds its lock,
//! disk full, read-only file system) are returned as [`QueueError::Open`]:
//! moving the store aside would not help and would hide readings that are fine.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};
use tsgw_core::{ChannelId, Metrics, QueueKey};

use crate::codec::{channel_prefix, claimed_len, decode_key, encode_key, is_meta_key, record_len};
use crate::config::QueueConfig;
use crate::durable_dir;
use crate::error::QueueError;
use crate::intent::{self, Intent, INTENT_KEY, REMOVE_CHUNK};
use crate::occupancy::{Counts, COUNTS_KEY};
use crate::progress::{log_progress, report_while_open, OpenPhase, OpenProgress, LOG_EVERY};

/// Key in sled's default tree naming the layout of the `readings` tree.
const FORMAT_KEY: &[u8] = b"tsgw-queue-format";
/// Value of [`FORMAT_KEY`] for this layout (see `codec`): records of readings.
const FORMAT_MARKER: &[u8] = b"tsgw-queue/2";
/// The first release's layout (one reading per entry). Its entries still
/// decode, so such a store is upgraded by rewriting the marker: a build that
/// only knows `/1` then refuses (quarantines) the store instead of dropping
/// the records it cannot read as damaged.
const LEGACY_MARKER: &[u8] = b"tsgw-queue/1";
const READINGS_TREE: &[u8] = b"readings";

/// An open store with its counts.
pub struct Opened {
    pub db: sled::Db,
    pub readings: sled::Tree,
    pub counts: Counts,
    /// Highest seq found in the store (0 when empty).
    pub max_seq: u64,
}

enum Failure {
    /// The store's content is bad: quarantine it.
    Broken(String),
    /// Something outside the store: report, keep the store.
    Environment(sled::Error),
}

/// Opens the store (see the module's rules), logging progress every
/// [`LOG_EVERY`] while that takes long and recording it in `progress`.
pub fn open_or_quarantine(
    config: &QueueConfig,
    metrics: &Metrics,
    progress: &OpenProgress,
) -> Result<Opened, QueueError> {
    progress.start();
    let dir = config.dir.clone();
    let _reporter = report_while_open(progress, LOG_EVERY, move |state| log_progress(&dir, state));
    let opened = open_or_quarantine_inner(config, metrics, progress);
    if opened.is_ok() {
        progress.finish();
    }
    opened
}

fn open_or_quarantine_inner(
    config: &QueueConfig,
    metrics: &Metrics,
    progress: &OpenProgress,
) -> Result<Opened, QueueError> {
    let dir = &config.dir;
    let cause = match try_open_waiting_for_lock(config, metrics, progress) {
        Ok(opened) => return Ok(opened),
        Err(Failure::Environment(source)) => {
            return Err(QueueError::Open {
                dir: dir.clone(),
                source,
            })
        }
        Err(Failure::Broken(cause)) => cause,
    };

    let aside = quarantine_path(dir);
    error!(
        dir = %dir.display(),
        moved_to = %aside.display(),
        %cause,
        "queue store cannot be opened; moving it aside and starting an empty queue \
         (readings in the old store are not forwarded)"
    );
    if let Err(e) = std::fs::rename(dir, &aside) {
        return Err(QueueError::Quarantine {
            dir: dir.clone(),
            cause,
            reason: format!("renaming it to {} failed: {e}", aside.display()),
        });
    }
    metrics.queue_quarantined_total.inc();
    progress.enter(OpenPhase::Recovering);
    match try_open_waiting_for_lock(config, metrics, progress) {
        Ok(opened) => {
            info!(dir = %dir.display(), "started a clean queue store");
            Ok(opened)
        }
        Err(Failure::Broken(reason)) => Err(QueueError::Quarantine {
            dir: dir.clone(),
            cause,
            reason: format!("the clean store is broken too: {reason}"),
        }),
        Err(Failure::Environment(e)) => Err(QueueError::Quarantine {
            dir: dir.clone(),
            cause,
            reason: format!("opening a clean store failed: {e}"),
        }),
    }
}

/// How long an open waits for a store closed in this process to let go.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// [`try_open`], retried while the store's file lock is still held. sled
/// writes sealed log buffers on background threads that keep the store's
/// file (and its lock) until they finish, so reopening a store right after
/// closing it can find it locked for a moment. Another process holding it
/// stays an error after the wait.
fn try_open_waiting_for_lock(
    config: &QueueConfig,
    metrics: &Metrics,
    progress: &OpenProgress,
) -> Result<Opened, Failure> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match try_open(config, metrics, progress) {
            Err(Failure::Environment(e)) if is_lock_held(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if is_lock_text(io))
}

fn is_lock_text(io: &std::io::Error) -> bool {
    io.to_string().contains("could not acquire lock")
}

/// `<dir>.corrupt-<unix-time>`, with a counter appended if that exists already.
fn quarantine_path(dir: &Path) -> PathBuf {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{}.corrupt-{now}", dir.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    candidate
}

fn try_open(
    config: &QueueConfig,
    metrics: &Metrics,
    progress: &OpenProgress,
) -> Result<Opened, Failure> {
    progress.enter(OpenPhase::Recovering);
    let sled_config = sled::Config::new()
        .path(&config.dir)
        .cache_capacity(config.cache_capacity_bytes)
        // Our flusher decides when to fsync (only when dirty, every
        // flush_interval_ms): sled's own 500 ms background flush would add
        // writes on the SD card that the configured interval is meant to limit.
        .flush_every_ms(None)
        // Keeps space amplification low; write throughput is far above what
        // a gateway ingests.
        .mode(sled::Mode::LowSpace);

    // sled writes `conf` when it creates a store; our marker follows at once.
    // An empty `conf` (sled: 8 bytes or less) is a creation a power cut
    // interrupted before `durable_dir` synced it: nothing was acked into it.
    let existed =
        std::fs::metadata(config.dir.join("conf")).is_ok_and(|m| m.is_file() && m.len() > 8);

    // sled 0.34 can panic (rather than return an error) on some damaged files.
    let db = match catch_unwind(AssertUnwindSafe(|| sled_config.open())) {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(classify(e)),
        Err(panic) => {
            return Err(Failure::Broken(format!(
                "sled panicked: {}",
                panic_text(&panic)
            )))
        }
    };

    check_format(&db, existed)?;
    durable_dir::sync_store(&config.dir)
        .map_err(|e| Failure::Environment(sled::Error::Io(e.into_io())))?;
    let readings = db
        .open_tree(READINGS_TREE)
        .map_err(|e| broken_unless_environment("opening the readings tree", e))?;
    // A removal cut short is finished before counting: its counts record is
    // in its intent, and the readings it already removed are not lost.
    let interrupted = stored_intent(&readings)?;
    let chunked = match interrupted {
        Some(Intent::Whole { counts_after, keys }) => {
            finish_whole_removal(&readings, &counts_after, &keys, progress)?;
            None
        }
        Some(Intent::Chunked(keys)) => Some(keys),
        None => None,
    };
    progress.enter(OpenPhase::Counting);
    let (mut counts, max_seq) = load_counts(&readings, metrics, progress)?;
    if let Some(keys) = chunked {
        finish_chunked_removal(&readings, &keys, &mut counts, max_seq, progress)?;
    }
    Ok(Opened {
        db,
        readings,
        counts,
        max_seq,
    })
}

/// A fresh store gets the marker; an existing one must carry ours.
///
/// sled treats damage in its log as the end of the log and recovers what came
/// before, which can be nothing at all: an existing store without the marker
/// lost (at least) its beginning, so it is quarantined rather than silently
/// restarted empty, keeping the files for a post-mortem.
fn check_format(db: &sled::Db, existed: bool) -> Result<(), Failure> {
    let marker = db
        .get(FORMAT_KEY)
        .map_err(|e| broken_unless_environment("reading the format marker", e))?;
    match marker {
        Some(m) if m.as_ref() == FORMAT_MARKER => Ok(()),
        Some(m) if m.as_ref() == LEGACY_MARKER => {
            db.insert(FORMAT_KEY, FORMAT_MARKER)
                .map_err(|e| broken_unless_environment("upgrading the format marker", e))?;
            info!(
                "queue store upgraded to {:?}",
                String::from_utf8_lossy(FORMAT_MARKER)
            );
            Ok(())
        }
        Some(m) => Err(Failure::Broken(format!(
            "unknown store format {:?} (expected {:?})",
            String::from_utf8_lossy(&m),
            String::from_utf8_lossy(FORMAT_MARKER)
        ))),
        None => {
            let has_data = db.tree_names().len() > 1 || !db.is_empty();
            if has_data {
                return Err(Failure::Broken(
                    "the directory holds a sled store that is not a tsgw queue".into(),
                ));
            }
            if existed {
                return Err(Failure::Broken(
                    "the store recovered without its format marker: its log is damaged".into(),
                ));
            }
            db.insert(FORMAT_KEY, FORMAT_MARKER)
                .map_err(|e| broken_unless_environment("writing the format marker", e))?;
            db.flush()
                .map_err(|e| broken_unless_environment("flushing the format marker", e))?;
            Ok(())
        }
    }
}

/// The counts of what the store holds, from a scan that checks every
/// record's checksum (removing and counting damaged ones), stored as a fresh
/// counts record.
///
/// The scan is cheap since readings are stored in records (a million readings
/// are a few thousand entries). It is compared with what the stored counts
/// record (plus the records pushed after it) says the store should hold: sled
/// recovers only a prefix of a damaged log and says nothing, so readings the
/// record counts but the scan cannot find were lost in storage. They are
/// counted (`reason="lost_in_storage"`) and logged as an error.
fn load_counts(
    tree: &sled::Tree,
    metrics: &Metrics,
    progress: &OpenProgress,
) -> Result<(Counts, u64), Failure> {
    let recorded = stored_counts(tree)?;
    progress.enter(OpenPhase::Counting);
    // The record (plus what was pushed after it) is what the scan should
    // find: the progress can count down to it.
    if let Some((counts, _)) = &recorded {
        progress.expect(counts.total().readings);
    }
    let scanned = scan(tree, metrics, progress)?;
    let mut max_seq = scanned.max_seq;
    if let Some((mut expected, covered_seq)) = recorded {
        max_seq = max_seq.max(covered_seq);
        for (&channel, &(readings, bytes)) in &scanned.corrupt {
            expected.sub(channel, readings, bytes);
        }
        report_lost_in_storage(&expected, &scanned.counts, metrics);
    }
    tree.insert(COUNTS_KEY, scanned.counts.encode(max_seq))
        .map_err(|e| broken_unless_environment("storing the queue counts", e))?;
    Ok((scanned.counts, max_seq))
}

/// Counts and logs the readings `expected` holds beyond what was `found`.
fn report_lost_in_storage(expected: &Counts, found: &Counts, metrics: &Metrics) {
    let lost: BTreeMap<u64, u64> = expected
        .channels()
        .into_iter()
        .filter_map(|ch| {
            let missing = expected
                .of(ch)
                .readings
                .saturating_sub(found.of(ch).readings);
            (missing > 0).then_some((ch.get(), missing))
        })
        .collect();
    let total: u64 = lost.values().sum();
    if total == 0 {
        return;
    }
    metrics
        .queue_dropped_total
        .with_label_values(&["lost_in_storage"])
        .inc_by(total);
    error!(
        lost = total,
        per_channel = ?lost,
        "the queue store came back without readings it had stored: sled recovered only \
         part of its log (damaged storage, or a power cut the storage did not survive)"
    );
}

fn stored_counts(tree: &sled::Tree) -> Result<Option<(Counts, u64)>, Failure> {
    let record = tree
        .get(COUNTS_KEY)
        .map_err(|e| broken_unless_environment("reading the queue counts", e))?;
    let Some(record) = record else {
        return Ok(None);
    };
    let (mut counts, covered_seq) = match Counts::decode(&record) {
        Ok(decoded) => decoded,
        Err(reason) => {
            warn!(%reason, "the queue's counts record is damaged; counting by a full scan");
            return Ok(None);
        }
    };
    let Some((channels, _)) = present_channels(tree)? else {
        // An undecodable key: the full scan removes and counts it.
        return Ok(None);
    };
    // Readings pushed after the record was written.
    if let Some(first_uncovered) = covered_seq.checked_add(1) {
        for &channel in &channels {
            let from = encode_key(QueueKey {
                channel,
                seq: first_uncovered,
            });
            for item in tree.range(from..).take_while(|item| {
                item.as_ref()
                    .map_or(true, |(k, _)| k.starts_with(&channel_prefix(channel)))
            }) {
                let (k, v) =
                    item.map_err(|e| broken_unless_environment("counting recent readings", e))?;
                let Ok(readings) = record_len(&v) else {
                    // A damaged record: the full scan removes and counts it.
                    return Ok(None);
                };
                counts.add(channel, readings, (k.len() + v.len()) as u64);
            }
        }
    }
    Ok(Some((counts, covered_seq)))
}

/// The channels holding readings, ascending, and the highest seq among them,
/// with two seeks per channel instead of a scan. `None` if a key other than
/// the counts record does not decode.
fn present_channels(tree: &sled::Tree) -> Result<Option<(Vec<ChannelId>, u64)>, Failure> {
    let failed = |e| broken_unless_environment("listing the queued channels", e);
    let mut channels = Vec::new();
    let mut max_seq = 0;
    let mut from: Vec<u8> = Vec::new();
    while let Some(item) = tree.range(from.as_slice()..).next() {
        let (k, _) = item.map_err(failed)?;
        if is_meta_key(&k) {
            from = [k.as_ref(), &[0]].concat();
            continue;
        }
        let Ok(first) = decode_key(&k) else {
            return Ok(None);
        };
        let prefix = channel_prefix(first.channel);
        if let Some(last) = tree.scan_prefix(prefix).next_back() {
            let (k, _) = last.map_err(failed)?;
            let Ok(last) = decode_key(&k) else {
                return Ok(None);
            };
            max_seq = max_seq.max(last.seq);
        }
        channels.push(first.channel);
        match first.channel.get().checked_add(1) {
            Some(next) => from = next.to_be_bytes().to_vec(),
            None => break,
        }
    }
    Ok(Some((channels, max_seq)))
}

/// The intent record of a removal that a crash interrupted, if any. A damaged
/// one is deleted: the readings it named stay queued and go out again, and
/// ThingSpeak refuses the repeated created_at, so nothing is stored twice.
fn stored_intent(tree: &sled::Tree) -> Result<Option<Intent>, Failure> {
    let failed = |e| broken_unless_environment("reading a removal intent", e);
    let Some(record) = tree.get(INTENT_KEY).map_err(failed)? else {
        return Ok(None);
    };
    match intent::decode(&record) {
        Ok(intent) => Ok(Some(intent)),
        Err(reason) => {
            warn!(%reason, "ignoring a damaged removal intent record");
            tree.remove(INTENT_KEY).map_err(failed)?;
            Ok(None)
        }
    }
}

/// Finishes a removal of single operations (see `intent`): the records it did
/// not reach yet are removed, and its counts record is stored, so counting
/// afterwards finds the store as the removal left it.
fn finish_whole_removal(
    tree: &sled::Tree,
    counts_after: &[u8],
    keys: &[QueueKey],
    progress: &OpenProgress,
) -> Result<(), Failure> {
    let failed = |e| broken_unless_environment("finishing an interrupted removal", e);
    progress.enter(OpenPhase::FinishingRemoval);
    progress.expect(keys.len() as u64);
    // What these records count is in `counts_after` already.
    let removal = intent::removal(tree, keys, &mut Counts::default()).map_err(failed)?;
    let removed = removal.readings();
    let mut batch = removal.into_batch();
    batch.insert(COUNTS_KEY, counts_after);
    batch.remove(INTENT_KEY);
    tree.apply_batch(batch).map_err(failed)?;
    progress.add(keys.len() as u64);
    info!(
        removed,
        "finished removing delivered readings whose removal a stop interrupted"
    );
    Ok(())
}

/// A chunked removal of an older build that a crash interrupted: finish it
/// after counting, chunk by chunk with the counts record, as it was begun.
fn finish_chunked_removal(
    tree: &sled::Tree,
    keys: &[QueueKey],
    counts: &mut Counts,
    max_seq: u64,
    progress: &OpenProgress,
) -> Result<(), Failure> {
    let failed = |e| broken_unless_environment("finishing an interrupted removal", e);
    let mut removed = 0;
    progress.enter(OpenPhase::FinishingRemoval);
    progress.expect(keys.len() as u64);
    for chunk in keys.chunks(REMOVE_CHUNK) {
        let removal = intent::removal(tree, chunk, counts).map_err(failed)?;
        removed += removal.readings();
        let mut batch = removal.into_batch();
        batch.insert(COUNTS_KEY, counts.encode(max_seq));
        tree.apply_batch(batch).map_err(failed)?;
        progress.add(chunk.len() as u64);
    }
    tree.remove(INTENT_KEY).map_err(failed)?;
    info!(
        removed,
        "finished removing delivered readings whose removal a stop interrupted"
    );
    Ok(())
}

/// What a full scan found.
struct Scanned {
    counts: Counts,
    max_seq: u64,
    /// Damaged records removed, per channel: readings they held (as far as
    /// they say) and bytes.
    corrupt: BTreeMap<ChannelId, (u64, u64)>,
}

/// Counts what the store holds, checking every record's checksum, and removes
/// (counting, `reason="corrupt"`) records that fail.
fn scan(tree: &sled::Tree, metrics: &Metrics, progress: &OpenProgress) -> Result<Scanned, Failure> {
    let mut scanned = Scanned {
        counts: Counts::default(),
        max_seq: 0,
        corrupt: BTreeMap::new(),
    };
    let mut damaged: Vec<(sled::IVec, String)> = Vec::new();
    let mut corrupt_readings = 0;
    for item in tree.iter() {
        let (k, v) = item.map_err(|e| broken_unless_environment("scanning the queue", e))?;
        if is_meta_key(&k) {
            continue;
        }
        let bytes = (k.len() + v.len()) as u64;
        match decode_key(&k).map(|key| (key, record_len(&v))) {
            Ok((key, Ok(readings))) => {
                scanned.counts.add(key.channel, readings, bytes);
                scanned.max_seq = scanned.max_seq.max(key.seq);
                progress.add(readings);
            }
            Ok((key, Err(e))) => {
                let readings = claimed_len(&v);
                let entry = scanned.corrupt.entry(key.channel).or_default();
                entry.0 += readings;
                entry.1 += bytes;
                corrupt_readings += readings;
                scanned.max_seq = scanned.max_seq.max(key.seq);
                damaged.push((k, e.to_string()));
            }
            Err(e) => {
                corrupt_readings += 1;
                damaged.push((k, e.to_string()));
            }
        }
    }
    if !damaged.is_empty() {
        let mut batch = sled::Batch::default();
        for (k, _) in &damaged {
            batch.remove(k.clone());
        }
        tree.apply_batch(batch)
            .map_err(|e| broken_unless_environment("removing damaged records", e))?;
        metrics
            .queue_dropped_total
            .with_label_values(&["corrupt"])
            .inc_by(corrupt_readings);
        let per_channel: BTreeMap<u64, u64> = scanned
            .corrupt
            .iter()
            .map(|(ch, (readings, _))| (ch.get(), *readings))
            .collect();
        error!(
            dropped = corrupt_readings,
            records = damaged.len(),
            ?per_channel,
            first_reason = %damaged[0].1,
            "removed damaged queue records (their checksum or layout is wrong)"
        );
    }
    Ok(scanned)
}

fn broken_unless_environment(what: &str, e: sled::Error) -> Failure {
    match classify(e) {
        Failure::Broken(cause) => Failure::Broken(format!("{what}: {cause}")),
        env => env,
    }
}

fn classify(e: sled::Error) -> Failure {
    match &e {
        sled::Error::Io(io) if is_environmental(io) => Failure::Environment(e),
        _ => Failure::Broken(e.to_string()),
    }
}

/// I/O errors whose cause lies outside the store's files.
fn is_environmental(io: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(
        io.kind(),
        ErrorKind::PermissionDenied | ErrorKind::WouldBlock
    ) {
        return true;
    }
    // sled reports a held lock as ErrorKind::Other with this text.
    if is_lock_text(io) {
        return true;
    }
    matches!(
        io.raw_os_error(),
        Some(
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EROFS
                | libc::EACCES
                | libc::EPERM
                | libc::EBUSY
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
        )
    )
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn environment_errors_keep_the_store() {
        let env = [
            io::Error::from(io::ErrorKind::PermissionDenied),
            io::Error::from_raw_os_error(libc::ENOSPC),
            io::Error::from_raw_os_error(libc::EROFS),
            io::Error::other("could not acquire lock on \"/q/db\": Os { code: 11 }"),
        ];
        for e in env {
            let text = e.to_string();
            assert!(
                matches!(classify(sled::Error::Io(e)), Failure::Environment(_)),
                "{text}"
            );
        }
    }

    #[test]
    fn content_errors_quarantine() {
        let broken = [
            sled::Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof)),
            sled::Error::Io(io::Error::from_raw_os_error(libc::ENOTDIR)),
            sled::Error::Unsupported("segment size changed".into()),
            sled::Error::ReportableBug("oops".into()),
        ];
        for e in broken {
            let text = e.to_string();
            assert!(matches!(classify(e), Failure::Broken(_)), "{text}");
        }
    }

    #[test]
    fn quarantine_names_do_not_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("q");
        let first = quarantine_path(&dir);
        std::fs::create_dir(&first).unwrap();
        let second = quarantine_path(&dir);
        assert_ne!(first, second);
        assert!(
            second.to_string_lossy().contains("q.corrupt-"),
            "{second:?}"
        );
    }
}
