//! Giving the disk back after a drain: moving to a fresh store.
//!
//! sled never shrinks its files: a store that held a million readings keeps
//! its size after they are delivered (measured: 43 MiB for an empty queue).
//! On a Pi's SD card that space is wanted back. When the queue is empty and
//! its files are larger than [`RETURN_SPACE_ABOVE`], the flusher moves to a
//! fresh store (see `DurableQueue::return_space_if_drained`):
//!
//! 1. the old store is flushed (it holds nothing: delivered removals only);
//! 2. a fresh store is built in `<dir>.fresh`, carrying the highest seq handed
//!    out, flushed, closed, and every file and the directory fsynced;
//! 3. `<dir>` is renamed to `<dir>.old`, `<dir>.fresh` to `<dir>`, the parent
//!    directory fsynced, and `<dir>.old` deleted.
//!
//! Pushes wait on the queue's lock meanwhile, so no reading can land in the
//! old store once it was found empty. A crash at any point leaves an empty
//! store to continue with: opening first finishes or undoes the move
//! ([`recover_interrupted_swap`]), and what it deletes never held a reading.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// A drained store larger than this on disk is replaced by a fresh one. A
/// fresh store takes a few hundred KiB (sled's first segment and its conf).
pub const RETURN_SPACE_ABOVE: u64 = 2 << 20;

pub fn fresh_path(dir: &Path) -> PathBuf {
    sibling(dir, "fresh")
}

fn old_path(dir: &Path) -> PathBuf {
    sibling(dir, "old")
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dir.with_file_name(name)
}

/// Finishes or undoes a move to a fresh store that a crash interrupted.
/// Called before the store is opened.
pub fn recover_interrupted_swap(dir: &Path) -> io::Result<()> {
    let fresh = fresh_path(dir);
    let old = old_path(dir);
    if !dir.exists() && fresh.is_dir() {
        // Stopped between the two renames: the fresh store is complete.
        std::fs::rename(&fresh, dir)?;
        sync_parent(dir)?;
        info!(dir = %dir.display(), "finished moving to a fresh queue store after a restart");
    } else if fresh.exists() {
        // Stopped while building it: the old store is still in place.
        std::fs::remove_dir_all(&fresh)?;
    }
    if old.exists() {
        // A drained store whose deletion was interrupted.
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// Makes the fresh store at `fresh` the store at `dir` (steps 3 above).
pub fn install(fresh: &Path, dir: &Path) -> io::Result<()> {
    let old = old_path(dir);
    std::fs::rename(dir, &old)?;
    std::fs::rename(fresh, dir)?;
    sync_parent(dir)?;
    if let Err(e) = std::fs::remove_dir_all(&old) {
        // Harmless: the next open deletes it.
        warn!(dir = %old.display(), error = %e, "could not delete the drained queue store");
    }
    Ok(())
}

/// fsyncs every file in `dir` (recursively) and the directories themselves,
/// so a power cut cannot leave a store whose files the kernel never wrote.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            File::open(entry.path())?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()
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
        // Between the renames: only .old and .fresh exist.
        std::fs::create_dir(old_path(&dir)).unwrap();
        std::fs::create_dir(fresh_path(&dir)).unwrap();
        std::fs::write(fresh_path(&dir).join("marker"), b"fresh").unwrap();
        recover_interrupted_swap(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("marker")).unwrap(), b"fresh");
        assert!(!old_path(&dir).exists() && !fresh_path(&dir).exists());

        // While building: the store stays, the half-built one goes.
        std::fs::create_dir(fresh_path(&dir)).unwrap();
        recover_interrupted_swap(&dir).unwrap();
        assert!(dir.join("marker").exists());
        assert!(!fresh_path(&dir).exists());

        // Nothing to do.
        recover_interrupted_swap(&dir).unwrap();
        assert!(dir.join("marker").exists());
    }

    #[test]
    fn install_replaces_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("queue");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("db"), vec![0u8; 1 << 16]).unwrap();
        let fresh = fresh_path(&dir);
        std::fs::create_dir(&fresh).unwrap();
        std::fs::write(fresh.join("db"), b"new").unwrap();
        sync_tree(&fresh).unwrap();
        install(&fresh, &dir).unwrap();
        assert_eq!(std::fs::read(dir.join("db")).unwrap(), b"new");
        assert!(!old_path(&dir).exists());
        assert!(disk_usage(&dir) < 1 << 16);
    }
}
