//! Progress while a store opens. Usually that takes a fraction of a second;
//! a store whose counts record is missing or damaged is counted by a full
//! scan, and sled recovers a large log by reading all of it, which on an SD
//! card can take minutes. Meanwhile a line is logged every
//! [`LOG_EVERY`] (what it is doing, how many readings so far, for how long),
//! and [`OpenProgress::state`] tells the status page the same.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A progress line at most this often while the store opens.
pub const LOG_EVERY: Duration = Duration::from_secs(30);

/// What opening the store is busy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPhase {
    NotStarted,
    /// sled reads its log back (its own recovery; no count to show).
    Recovering,
    /// Counting the queued readings (a full scan, or those after the counts record).
    Counting,
    /// Removing delivered readings whose removal a stop interrupted.
    FinishingRemoval,
    Open,
}

impl OpenPhase {
    pub fn describe(self) -> &'static str {
        match self {
            OpenPhase::NotStarted => "not started",
            OpenPhase::Recovering => "recovering the store's log",
            OpenPhase::Counting => "counting queued readings",
            OpenPhase::FinishingRemoval => "finishing an interrupted removal",
            OpenPhase::Open => "open",
        }
    }

    fn from_u8(n: u8) -> Self {
        match n {
            1 => OpenPhase::Recovering,
            2 => OpenPhase::Counting,
            3 => OpenPhase::FinishingRemoval,
            4 => OpenPhase::Open,
            _ => OpenPhase::NotStarted,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            OpenPhase::NotStarted => 0,
            OpenPhase::Recovering => 1,
            OpenPhase::Counting => 2,
            OpenPhase::FinishingRemoval => 3,
            OpenPhase::Open => 4,
        }
    }
}

/// Where opening stands, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenState {
    pub phase: OpenPhase,
    /// Readings counted or removed in the current phase.
    pub items: u64,
    /// Since opening started (until it finished, once open).
    pub elapsed: Duration,
}

/// Shared progress of one open. Cheap to clone; updates are relaxed atomics.
#[derive(Debug, Clone, Default)]
pub struct OpenProgress {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    phase: AtomicU8,
    items: AtomicU64,
    times: Mutex<(Option<Instant>, Option<Duration>)>,
}

impl OpenProgress {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> OpenState {
        let (started, took) = *self.inner.times.lock().unwrap_or_else(|e| e.into_inner());
        OpenState {
            phase: OpenPhase::from_u8(self.inner.phase.load(Ordering::Relaxed)),
            items: self.inner.items.load(Ordering::Relaxed),
            elapsed: took.unwrap_or_else(|| started.map_or(Duration::ZERO, |s| s.elapsed())),
        }
    }

    /// Opening began (the queue calls these; public so a caller can show a
    /// progress in its own tests).
    pub fn start(&self) {
        let mut times = self.inner.times.lock().unwrap_or_else(|e| e.into_inner());
        *times = (Some(Instant::now()), None);
        drop(times);
        self.enter(OpenPhase::Recovering);
    }

    pub fn enter(&self, phase: OpenPhase) {
        self.inner.items.store(0, Ordering::Relaxed);
        self.inner.phase.store(phase.as_u8(), Ordering::Relaxed);
    }

    pub fn add(&self, items: u64) {
        self.inner.items.fetch_add(items, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        let mut times = self.inner.times.lock().unwrap_or_else(|e| e.into_inner());
        times.1 = Some(times.0.map_or(Duration::ZERO, |s| s.elapsed()));
        drop(times);
        self.inner
            .phase
            .store(OpenPhase::Open.as_u8(), Ordering::Relaxed);
    }
}

/// Calls `report` every `every` until the returned guard is dropped, from a
/// thread of its own: opening blocks the thread that does it.
pub(crate) fn report_while_open(
    progress: &OpenProgress,
    every: Duration,
    report: impl Fn(OpenState) + Send + 'static,
) -> ReportGuard {
    let (stop, stopped) = mpsc::channel::<()>();
    let progress = progress.clone();
    let spawned = std::thread::Builder::new()
        .name("tsgw-queue-open".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                report(progress.state());
            }
        });
    if let Err(e) = &spawned {
        tracing::warn!(error = %e, "cannot start the queue's progress reporter; opening goes on without progress lines");
    }
    ReportGuard {
        stop: Some(stop),
        thread: spawned.ok(),
    }
}

/// Stops the reporter (and waits for it) when dropped.
pub(crate) struct ReportGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ReportGuard {
    fn drop(&mut self) {
        // Dropping the sender wakes the reporter at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The progress line itself.
pub(crate) fn log_progress(dir: &std::path::Path, state: OpenState) {
    tracing::info!(
        dir = %dir.display(),
        phase = state.phase.describe(),
        readings = state.items,
        elapsed_secs = state.elapsed.as_secs(),
        "still opening the queue"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reporter_reports_until_dropped() {
        let progress = OpenProgress::new();
        progress.start();
        progress.enter(OpenPhase::Counting);
        progress.add(41);
        progress.add(1);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let guard = report_while_open(&progress, Duration::from_millis(5), move |s| {
            sink.lock().unwrap().push(s)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "no progress reports");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(guard);
        let after_drop = seen.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            seen.lock().unwrap().len(),
            after_drop,
            "reported after drop"
        );
        let first = seen.lock().unwrap()[0];
        assert_eq!((first.phase, first.items), (OpenPhase::Counting, 42));
        progress.finish();
        let done = progress.state();
        assert_eq!(done.phase, OpenPhase::Open);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            progress.state().elapsed,
            done.elapsed,
            "elapsed froze at finish"
        );
    }
}
