//! How much disk the queue takes, and how much is left where it lives.

use std::path::Path;

/// Bytes of the files under `dir` (sled keeps a handful), and bytes free for
/// an unprivileged writer on its file system. `None` where it cannot be read.
pub fn usage(dir: &Path) -> (Option<u64>, Option<u64>) {
    (used(dir), free(dir))
}

fn used(dir: &Path) -> Option<u64> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    // A bound on entries visited: the store has a few dozen at most.
    let mut budget = 10_000usize;
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).ok()? {
            budget = budget.checked_sub(1)?;
            let entry = entry.ok()?;
            let meta = entry.metadata().ok()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(meta.len());
            }
        }
    }
    Some(total)
}

fn free(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain integers, for which all zeroes is a value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a writable
    // statvfs; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets (armv7: u32)
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_files_below_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 28]).unwrap();
        let (used, free) = usage(dir.path());
        assert_eq!(used, Some(128));
        assert!(free.is_some_and(|f| f > 0));
        assert_eq!(usage(&dir.path().join("missing")), (None, None));
    }
}
