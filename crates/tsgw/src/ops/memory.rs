//! Keeping the resident set small on a Pi.
//!
//! glibc gives every thread that allocates its own malloc arena (up to 8 per
//! core) and keeps freed memory in them. The gateway's tokio workers and
//! sled's threads each touch the queue's buffers, so a drained backlog left
//! tens of MiB resident in arenas nobody used again (measured: 82 MiB with a
//! million-reading backlog, 71 MiB with `MALLOC_ARENA_MAX=1`). Two arenas keep
//! contention low for a gateway's handful of busy threads.

/// Arenas allowed when `MALLOC_ARENA_MAX` is not set by the operator.
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
const ARENAS: i32 = 2;

/// Caps glibc's malloc arenas unless `MALLOC_ARENA_MAX` already says how many.
/// Call before the runtime starts its threads. A no-op on other C libraries.
pub fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any
    // other thread exists, and glibc accepts M_ARENA_MAX at any time.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}
