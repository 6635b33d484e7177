//! tsgw's durable queue: the only place a reading lives between a source and
//! ThingSpeak.
//!
//! Built on sled 0.34, behind a small interface ([`DurableQueue`], which
//! implements [`tsgw_core::ReadingStore`] for the forwarder). The rules:
//! - **Order**: keys are `channel ++ seq` (big-endian), so each channel drains
//!   oldest first; seqs only grow, across restarts too.
//! - **Bounded**: encoded bytes never exceed `max_bytes`; a push that would,
//!   first drops the globally oldest readings (`tsgw_queue_dropped_total{reason="full"}`).
//! - **Durable**: a pushed reading is fsynced within `flush_interval_ms` by the
//!   flusher task (only when something changed); a clean shutdown flushes.
//! - **Self-healing**: an undecodable value is dropped and counted
//!   (`reason="corrupt"`); a store that cannot be opened is moved aside to
//!   `<dir>.corrupt-<unix-time>` and a clean one started
//!   (`tsgw_queue_quarantined_total`).
//! - **Failing disk**: a write error (disk full, I/O error) is returned by
//!   `push`/`flush` as [`QueueError::Storage`]; nothing panics. sled keeps its
//!   first I/O error and fails everything after it, so the flusher closes and
//!   reopens the store each interval until that works (pushes fail meanwhile,
//!   the caller counts them); flushed readings are kept.
//! - **Crash-tested**: `tests/crash.rs` SIGKILLs a writer mid-stream again and
//!   again and checks every reading it had flushed; that covers a process dying
//!   at any instruction, not a power cut (the page cache survives a kill), so
//!   power-loss safety rests on sled's fsync ordering. sled never fsyncs its
//!   `conf` nor any directory, so every open fsyncs the store's files, its
//!   directory and the parent before returning (see `durable_dir`).
//!   `tests/power_cut` cuts power on a FUSE file system that keeps only
//!   fsynced bytes, densely in the store's first second and during and after
//!   a move to a fresh store: the store always reopens with every acked
//!   reading. That takes an fdatasync of sled's `db` file after each flush
//!   (sled syncs it with `sync_file_range`, which leaves appended data's size
//!   and extents unsynced).
//! - **Space returned**: sled never shrinks its files, so once the queue is
//!   empty and its files take more than 2 MiB, the flusher moves to a fresh
//!   store, crash-safely (see `swap`).
//! - **Checksummed**: every record carries a CRC-32; a damaged one is dropped
//!   and counted by the readings it held (`reason="corrupt"`).
//! - **Cheap counts**: `len`/`bytes`/`channels` come from memory, and a
//!   counts record written atomically with every change lets a big backlog
//!   open without a scan (see `occupancy`).
//!
//! The value encoding is documented in [`codec`].

pub mod codec;
mod config;
mod droplog;
mod durable_dir;
mod error;
mod flusher;
mod intent;
mod occupancy;
mod open;
mod progress;
mod queue;
mod swap;
mod unflushed;

pub use config::QueueConfig;
pub use error::QueueError;
pub use progress::{OpenPhase, OpenProgress, OpenState};
pub use queue::DurableQueue;
