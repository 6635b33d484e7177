//! Making the store's files and directory entries durable once sled has
//! created or opened them.
//!
//! sled 0.34 writes `conf` at store creation, creates `db`, `blobs/` and
//! `snap.*` files, and never fsyncs `conf` nor any directory. Its flushes use
//! `sync_file_range` on `db`, which writes data pages but neither the file's
//! metadata nor the directory entries naming the files. After a power cut
//! within seconds of creation (before the kernel's writeback) ext4 can leave
//! the names with empty contents: an empty `conf` and a `db` without the
//! format marker, which `open` must then quarantine with whatever readings
//! had been acked into it.
//!
//! [`sync_store`] fsyncs, bottom-up, every regular file under the store
//! directory, every directory below it, the store directory itself and its
//! parent (whose entry names the store). Bottom-up, so that each name made
//! durable points at content already durable. An existing store is synced
//! the same way on every open: it costs one fsync per file (a handful), and a
//! store moved aside by quarantine gets its rename made durable too (the
//! parent's entries change).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// What [`sync_store`] fsynced, in order (files before the directories holding
/// them, the parent directory last).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Synced {
    pub files: Vec<PathBuf>,
    pub dirs: Vec<PathBuf>,
}

/// An fsync that failed, naming the path (an EIO here means the card lost
/// writes: reported as an environment error, not as a broken store).
#[derive(Debug, thiserror::Error)]
#[error("fsync of {path} failed: {source}")]
pub(crate) struct SyncError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl SyncError {
    pub fn into_io(self) -> io::Error {
        io::Error::new(self.source.kind(), self.to_string())
    }
}

/// Fsyncs everything under `dir`, then `dir`, then its parent.
pub(crate) fn sync_store(dir: &Path) -> Result<Synced, SyncError> {
    let mut synced = Synced::default();
    sync_tree(dir, &mut synced)?;
    if let Some(parent) = parent_dir(dir) {
        fsync(parent)?;
        synced.dirs.push(parent.to_path_buf());
    }
    Ok(synced)
}

/// The directory holding `dir`'s entry: "." for a one-component relative
/// path, none for "/".
fn parent_dir(dir: &Path) -> Option<&Path> {
    match dir.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(Path::new(".")),
        other => other,
    }
}

fn sync_tree(dir: &Path, synced: &mut Synced) -> Result<(), SyncError> {
    let failed = |source| SyncError {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(failed)?
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    // Stable order: the report (and the tests) do not depend on readdir's.
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().map_err(|source| SyncError {
            path: path.clone(),
            source,
        })?;
        if kind.is_dir() {
            sync_tree(&path, synced)?;
        } else if kind.is_file() {
            fsync(&path)?;
            synced.files.push(path);
        }
        // Anything else (a socket, a symlink someone left) is not sled's.
    }
    fsync(dir)?;
    synced.dirs.push(dir.to_path_buf());
    Ok(())
}

/// fsync through a read-only handle: Linux syncs the inode, whatever the
/// handle's mode, and a directory can only be opened read-only.
fn fsync(path: &Path) -> Result<(), SyncError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| SyncError {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_every_file_and_directory_of_a_fresh_sled_store() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("queue");
        let db = sled::Config::new().path(&dir).open().unwrap();
        db.insert(b"k", b"v").unwrap();
        db.flush().unwrap();

        let synced = sync_store(&dir).unwrap();

        // Every regular file sled created, wherever it put it.
        let mut expected_files = Vec::new();
        let mut expected_dirs = Vec::new();
        walk(&dir, &mut expected_files, &mut expected_dirs);
        expected_files.sort();
        let mut files = synced.files.clone();
        files.sort();
        assert_eq!(files, expected_files);
        assert!(files.contains(&dir.join("conf")), "{files:?}");
        assert!(files.contains(&dir.join("db")), "{files:?}");
        // Directories bottom-up: blobs/ before the store, the parent last.
        assert_eq!(
            synced.dirs,
            vec![dir.join("blobs"), dir.clone(), tmp.path().to_path_buf()]
        );
        assert_eq!(expected_dirs.len() + 2, synced.dirs.len());
    }

    #[test]
    fn the_parent_of_a_relative_store_is_the_working_directory() {
        assert_eq!(parent_dir(Path::new("queue")), Some(Path::new(".")));
        assert_eq!(parent_dir(Path::new("var/q")), Some(Path::new("var")));
        assert_eq!(
            parent_dir(Path::new("/var/lib/tsgw/queue")),
            Some(Path::new("/var/lib/tsgw"))
        );
        assert_eq!(parent_dir(Path::new("/")), None);
    }

    #[test]
    fn a_missing_store_names_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("absent");
        let e = sync_store(&dir).unwrap_err();
        assert_eq!(e.path, dir);
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("absent"), "{e}");
    }

    fn walk(dir: &Path, files: &mut Vec<PathBuf>, dirs: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path.clone());
                walk(&path, files, dirs);
            } else {
                files.push(path);
            }
        }
    }
}
