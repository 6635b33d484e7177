//! Giving the disk back after a drain: moving to a fresh store.
//!
//! sled never shrinks its files: a store that held a million readings keeps
//! its size after they are delivered (measured: 43 MiB for an empty queue).
//! On a Pi's SD card that space is wanted back. When the queue is empty and
//! its files are larger than [`RETURN_SPACE_ABOVE`], the flusher moves to a
//! fresh store (see `DurableQueue::return_space_if_drained`):
//!
//! 1. the old store is flushed (it holds nothing: delivered removals only)
//!    and closed;
//! 2. `<dir>` is renamed to `<dir>.old` and the parent directory fsynced;
//! 3. a fresh store is created at `<dir>` (its files and directories fsynced
//!    as at every open), carrying the highest seq handed out, flushed, and
//!    marked complete (a file, fsynced);
//! 4. `<dir>.old` is deleted.
//!
//! Pushes wait on the queue's lock meanwhile, so no reading can land in the
//! old store once it was found empty. A crash at any point leaves an empty
//! store to continue with: opening first finishes or undoes the move
//! ([`recover_interrupted_swap`]), and what it deletes never held a reading.
//!
//! The fresh store is created where it will stay rather than built aside and
//! renamed into place: sled rewrites its snapshot when it opens an existing
//! store, and the power-cut test (`tests/power_cut`) caught a cut during that
//! second open leaving a store sled could not open (quarantined, though
//! empty). A store cut short while being created starts clean instead.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// A drained store larger than this on disk is replaced by a fresh one. A
/// fresh store takes a few hundred KiB (sled's first segment and its conf).
pub const RETURN_SPACE_ABOVE: u64 = 2 << 20;

fn old_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".old");
    dir.with_file_name(name)
}

/// Written into the fresh store once it is whole (created, its seq floor
/// flushed): until then an interrupted move is undone, after it finished.
const COMPLETE_FILE: &str = "tsgw-fresh-store-complete";

/// Finishes or undoes a move to a fresh store that a crash interrupted.
/// Called before the store is opened.
pub fn recover_interrupted_swap(dir: &Path) -> io::Result<()> {
    let old = old_path(dir);
    if !old.exists() {
        return Ok(());
    }
    if dir.join(COMPLETE_FILE).exists() {
        // The fresh store was finished: it is the store now, and the old one
        // was empty.
        std::fs::remove_dir_all(&old)?;
        return Ok(());
    }
    // Stopped before the fresh store was whole (a SIGKILL while sled created
    // it leaves a store without our format marker): it never held a reading
    // (pushes wait for the move), and the old one is whole and empty, so take
    // the old one back; the next drain check tries again.
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&old, dir)?;
    sync_parent(dir)?;
    info!(dir = %dir.display(), "undid an interrupted move to a fresh queue store");
    Ok(())
}

/// Records that the fresh store at `dir` is whole (step 3 above), durably.
pub fn mark_complete(dir: &Path) -> io::Result<()> {
    let path = dir.join(COMPLETE_FILE);
    std::fs::write(&path, b"the move to this store finished\n")?;
    File::open(&path)?.sync_all()?;
    File::open(dir)?.sync_all()
}

/// Moves the (drained, closed) store at `dir` aside (step 2 above).
pub fn retire(dir: &Path) -> io::Result<()> {
    std::fs::rename(dir, old_path(dir))?;
    sync_parent(dir)
}

/// Deletes the retired store (step 4 above).
pub fn delete_retired(dir: &Path) {
    let old = old_path(dir);
    if let Err(e) = std::fs::remove_dir_all(&old) {
        // Harmless: the next open deletes it.
        warn!(dir = %old.display(), error = %e, "could not delete the drained queue store");
    }
}

fn sync_parent(dir: &Path) -> io::Result<()> {
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks, so sparse
/// files count for what they use).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&entry.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_move_is_finished_or_undone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("queue");
        // Nothing to do.
        recover_interrupted_swap(&dir).unwrap();

        // Stopped after the old store went aside: it comes back.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("db"), b"old").unwrap();
        retire(&dir).unwrap();
        assert!(!dir.exists());
        recover_interrupted_swap(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("db")).unwrap(), b"old");
        assert!(!old_path(&dir).exists());

        // Stopped while the fresh one was created: the old one comes back.
        retire(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("db"), b"half").unwrap();
        recover_interrupted_swap(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("db")).unwrap(), b"old");
        assert!(!old_path(&dir).exists());

        // Stopped after the fresh one was whole: it stays.
        retire(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("db"), b"fresh").unwrap();
        mark_complete(&dir).unwrap();
        recover_interrupted_swap(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("db")).unwrap(), b"fresh");
        assert!(!old_path(&dir).exists());

        retire(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        delete_retired(&dir);
        assert!(!old_path(&dir).exists());
    }
}
