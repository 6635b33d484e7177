//! `PowerCutFs`: an in-memory FUSE file system that remembers, besides what
//! a process sees, what a power cut at this instant would leave on the disk.
//!
//! Every file keeps its live bytes and the bytes of its last `fsync` or
//! `fdatasync` (none before the first); every directory keeps its live
//! entries and those of its last `fsync` (FUSE `fsyncdir`). [`PowerCut::image`]
//! takes both views under one lock, so a cut is atomic with respect to the
//! writer, and renders what a cut leaves in one of two ways that real file
//! systems produce:
//!
//! - [`Cut::Strict`], POSIX taken literally: a name exists only if its
//!   directory was fsynced since it was made, a file holds only its fsynced
//!   bytes;
//! - [`Cut::MetadataOnly`], ext4 (`data=ordered`, delayed allocation) after a
//!   journal commit but before writeback: every name and directory of the
//!   moment exists, but a file holds only its fsynced bytes (empty if it was
//!   never fsynced). This is what left sled's `conf` empty.
//!
//! Limits, stated so nobody reads more into a pass: writes are modelled per
//! file, not per block, so a torn write inside a file (half a page) is not
//! produced, and neither are the reorderings of a disk's volatile cache
//! (the model assumes fsync reaches the medium). `sync_file_range` never
//! reaches a FUSE file system (its writes are synchronous already), so
//! bytes it "synced" count as not synced: that is the POSIX contract, and on
//! ext4 it is the truth for appended data, whose size and extents only the
//! next journal commit records. File locks are the kernel's (no FUSE lock
//! support is announced), so sled's `flock` works as on any local disk.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};
use libc::{EEXIST, EINVAL, EISDIR, ENOENT, ENOTDIR, ENOTEMPTY};

const ROOT: u64 = 1;
/// Attributes are never cached by the kernel: every size comes from here.
const TTL: Duration = Duration::ZERO;

/// Which surviving state a power cut leaves (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    Strict,
    MetadataOnly,
}

/// What a cut left: directories and files, paths relative to the mount.
#[derive(Debug, Default, Clone)]
pub struct Image {
    pub dirs: Vec<std::path::PathBuf>,
    pub files: Vec<(std::path::PathBuf, Vec<u8>)>,
}

impl Image {
    /// Writes the image under `root` (a real directory) to open it there.
    pub fn materialize(&self, root: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(root)?;
        for d in &self.dirs {
            std::fs::create_dir_all(root.join(d))?;
        }
        for (f, bytes) in &self.files {
            std::fs::write(root.join(f), bytes)?;
        }
        Ok(())
    }

    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files
            .iter()
            .find(|(p, _)| p == Path::new(path))
            .map(|(_, b)| b.as_slice())
    }
}

enum Node {
    File {
        live: Vec<u8>,
        synced: Option<Vec<u8>>,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        synced: BTreeMap<OsString, u64>,
    },
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// fsync/fdatasync calls on files, and on directories (for the tests' report).
    file_syncs: u64,
    dir_syncs: u64,
}

/// The handle the test keeps: cuts are taken through it while the file
/// system serves the mount.
#[derive(Clone)]
pub struct PowerCut {
    state: Arc<Mutex<State>>,
}

impl PowerCut {
    pub fn new() -> (PowerCut, PowerCutFs) {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node::Dir {
                live: BTreeMap::new(),
                synced: BTreeMap::new(),
            },
        );
        let state = Arc::new(Mutex::new(State {
            nodes,
            next_ino: ROOT + 1,
            file_syncs: 0,
            dir_syncs: 0,
        }));
        (
            PowerCut {
                state: state.clone(),
            },
            PowerCutFs { state },
        )
    }

    /// What a power cut now would leave, rendered as `cut` says.
    pub fn image(&self, cut: Cut) -> Image {
        let state = lock(&self.state);
        let mut image = Image::default();
        collect(&state, ROOT, Path::new(""), cut, &mut image);
        image
    }

    /// (file syncs, directory syncs) so far.
    pub fn syncs(&self) -> (u64, u64) {
        let state = lock(&self.state);
        (state.file_syncs, state.dir_syncs)
    }
}

fn collect(state: &State, dir: u64, at: &Path, cut: Cut, image: &mut Image) {
    let Some(Node::Dir { live, synced }) = state.nodes.get(&dir) else {
        return;
    };
    let entries = match cut {
        Cut::Strict => synced,
        Cut::MetadataOnly => live,
    };
    for (name, ino) in entries {
        let path = at.join(name);
        match state.nodes.get(ino) {
            Some(Node::Dir { .. }) => {
                image.dirs.push(path.clone());
                collect(state, *ino, &path, cut, image);
            }
            Some(Node::File { synced, .. }) => {
                image.files.push((path, synced.clone().unwrap_or_default()));
            }
            // An entry whose inode is gone (unlinked since the dir's sync):
            // the disk would still hold it with its synced bytes, which we
            // dropped; leave it out rather than invent content.
            None => {}
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The FUSE side (moved into the session).
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
}

fn attr(ino: u64, node: &Node) -> FileAttr {
    let (kind, size, perm, nlink) = match node {
        Node::File { live, .. } => (FileType::RegularFile, live.len() as u64, 0o644, 1),
        Node::Dir { .. } => (FileType::Directory, 0, 0o755, 2),
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl State {
    fn dir_entries(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, i32> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir { live, .. }) => Ok(live),
            Some(Node::File { .. }) => Err(ENOTDIR),
            None => Err(ENOENT),
        }
    }

    fn make(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<FileAttr, i32> {
        let ino = self.next_ino;
        let entries = self.dir_entries(parent)?;
        if entries.contains_key(name) {
            return Err(EEXIST);
        }
        entries.insert(name.to_owned(), ino);
        self.next_ino += 1;
        let a = attr(ino, &node);
        self.nodes.insert(ino, node);
        Ok(a)
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<FileAttr, i32> {
        let ino = *self.dir_entries(parent)?.get(name).ok_or(ENOENT)?;
        self.nodes.get(&ino).map(|n| attr(ino, n)).ok_or(ENOENT)
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match lock(&self.state).lookup(parent, name) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match lock(&self.state).nodes.get(&ino) {
            Some(n) => reply.attr(&TTL, &attr(ino, n)),
            None => reply.error(ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut state = lock(&self.state);
        match state.nodes.get_mut(&ino) {
            Some(Node::File { live, .. }) => {
                if let Some(size) = size {
                    live.resize(size as usize, 0);
                }
                reply.attr(&TTL, &attr(ino, &state.nodes[&ino]));
            }
            Some(n @ Node::Dir { .. }) => {
                if size.is_some() {
                    reply.error(EISDIR);
                } else {
                    reply.attr(&TTL, &attr(ino, n));
                }
            }
            None => reply.error(ENOENT),
        }
    }

    fn mknod(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(EINVAL);
        }
        let file = Node::File {
            live: Vec::new(),
            synced: None,
        };
        match lock(&self.state).make(parent, name, file) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let file = Node::File {
            live: Vec::new(),
            synced: None,
        };
        match lock(&self.state).make(parent, name, file) {
            Ok(a) => reply.created(&TTL, &a, 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let dir = Node::Dir {
            live: BTreeMap::new(),
            synced: BTreeMap::new(),
        };
        match lock(&self.state).make(parent, name, dir) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut state = lock(&self.state);
        let removed = state
            .dir_entries(parent)
            .and_then(|e| e.remove(name).ok_or(ENOENT));
        // The inode stays (open handles keep using it, as on a disk).
        match removed {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut state = lock(&self.state);
        let ino = match state.dir_entries(parent).map(|e| e.get(name).copied()) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(ENOENT),
            Err(e) => return reply.error(e),
        };
        match state.nodes.get(&ino) {
            Some(Node::Dir { live, .. }) if !live.is_empty() => return reply.error(ENOTEMPTY),
            Some(Node::File { .. }) => return reply.error(ENOTDIR),
            _ => {}
        }
        if let Ok(e) = state.dir_entries(parent) {
            e.remove(name);
        }
        reply.ok()
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.state);
        let ino = match state.dir_entries(parent).map(|e| e.remove(name)) {
            Ok(Some(ino)) => ino,
            Ok(None) => return reply.error(ENOENT),
            Err(e) => return reply.error(e),
        };
        match state.dir_entries(newparent) {
            Ok(e) => {
                e.insert(newname.to_owned(), ino);
            }
            Err(err) => {
                // Put it back: the rename did not happen.
                if let Ok(e) = state.dir_entries(parent) {
                    e.insert(name.to_owned(), ino);
                }
                return reply.error(err);
            }
        }
        reply.ok()
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        match lock(&self.state).nodes.get(&ino) {
            Some(Node::File { live, .. }) => {
                let start = (offset.max(0) as usize).min(live.len());
                let end = start.saturating_add(size as usize).min(live.len());
                reply.data(&live[start..end]);
            }
            Some(Node::Dir { .. }) => reply.error(EISDIR),
            None => reply.error(ENOENT),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        match lock(&self.state).nodes.get_mut(&ino) {
            Some(Node::File { live, .. }) => {
                let start = offset.max(0) as usize;
                let end = start + data.len();
                if live.len() < end {
                    live.resize(end, 0);
                }
                live[start..end].copy_from_slice(data);
                reply.written(data.len() as u32);
            }
            Some(Node::Dir { .. }) => reply.error(EISDIR),
            None => reply.error(ENOENT),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        // close(2): nothing becomes durable by closing a file.
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.state);
        match state.nodes.get_mut(&ino) {
            Some(Node::File { live, synced }) => {
                *synced = Some(live.clone());
                state.file_syncs += 1;
                reply.ok()
            }
            Some(Node::Dir { live, synced }) => {
                *synced = live.clone();
                state.dir_syncs += 1;
                reply.ok()
            }
            None => reply.error(ENOENT),
        }
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut state = lock(&self.state);
        match state.nodes.get_mut(&ino) {
            Some(Node::Dir { live, synced }) => {
                *synced = live.clone();
                state.dir_syncs += 1;
                reply.ok()
            }
            Some(Node::File { .. }) => reply.error(ENOTDIR),
            None => reply.error(ENOENT),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = lock(&self.state);
        let live = match state.dir_entries(ino) {
            Ok(live) => live.clone(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (ino, FileType::Directory, OsString::from("..")),
        ];
        for (name, i) in live {
            let kind = match state.nodes.get(&i) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((i, kind, name));
        }
        for (n, (i, kind, name)) in all.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(i, (n + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}
