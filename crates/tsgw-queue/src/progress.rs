//! Progress while a store opens. Usually that takes a fraction of a second;
//! a store whose counts record is missing or damaged is counted by a full
//! scan, and sled recovers a large log by reading all of it, which on an SD
//! card can take minutes. Meanwhile a line is logged every
//! [`LOG_EVERY`] (what it is doing, how many readings so far, for how long,
//! at what rate, and, when the store's counts record says how many there
//! are, how many are left and when it will be done), and
//! [`OpenProgress::state`] tells the status page the same.

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
    /// Since the current phase started.
    pub phase_elapsed: Duration,
    /// Readings the current phase will get through, when known: the store's
    /// counts record says how many it holds; an interrupted removal, how
    /// many it removes.
    pub expected: Option<u64>,
}

/// A phase shorter than this has no rate yet: a few readings in a few
/// milliseconds would promise a wild one.
const RATE_AFTER: Duration = Duration::from_secs(1);

impl OpenState {
    /// Readings a second in the current phase; `None` while sled recovers
    /// (it counts nothing) and in the phase's first second.
    pub fn rate(&self) -> Option<f64> {
        let counts = matches!(
            self.phase,
            OpenPhase::Counting | OpenPhase::FinishingRemoval
        );
        (counts && self.phase_elapsed >= RATE_AFTER)
            .then(|| self.items as f64 / self.phase_elapsed.as_secs_f64())
    }

    /// Readings the current phase has still to go through, when known.
    pub fn left(&self) -> Option<u64> {
        self.expected.map(|e| e.saturating_sub(self.items))
    }

    /// When the phase will be done at its rate so far; `None` without an
    /// expected total or a rate above zero.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.left()?;
        let rate = self.rate().filter(|r| *r > 0.0)?;
        Some(Duration::from_secs_f64(left as f64 / rate))
    }
}

/// [`Inner::expected`] when no total is known.
const UNKNOWN: u64 = u64::MAX;

/// Shared progress of one open. Cheap to clone; updates are relaxed atomics.
#[derive(Debug, Clone, Default)]
pub struct OpenProgress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    phase: AtomicU8,
    items: AtomicU64,
    /// [`UNKNOWN`] unless the phase was told its total.
    expected: AtomicU64,
    times: Mutex<Times>,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            phase: AtomicU8::default(),
            items: AtomicU64::default(),
            expected: AtomicU64::new(UNKNOWN),
            times: Mutex::default(),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Times {
    started: Option<Instant>,
    /// How long opening took, once it finished.
    took: Option<Duration>,
    phase_started: Option<Instant>,
}

impl OpenProgress {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> OpenState {
        let times = *self.inner.times.lock().unwrap_or_else(|e| e.into_inner());
        let since = |t: Option<Instant>| t.map_or(Duration::ZERO, |t| t.elapsed());
        let expected = self.inner.expected.load(Ordering::Relaxed);
        OpenState {
            phase: OpenPhase::from_u8(self.inner.phase.load(Ordering::Relaxed)),
            items: self.inner.items.load(Ordering::Relaxed),
            elapsed: times.took.unwrap_or_else(|| since(times.started)),
            phase_elapsed: since(times.phase_started),
            expected: (expected != UNKNOWN).then_some(expected),
        }
    }

    /// Opening began (the queue calls these; public so a caller can show a
    /// progress in its own tests).
    pub fn start(&self) {
        let mut times = self.inner.times.lock().unwrap_or_else(|e| e.into_inner());
        *times = Times {
            started: Some(Instant::now()),
            ..Times::default()
        };
        drop(times);
        self.enter(OpenPhase::Recovering);
    }

    pub fn enter(&self, phase: OpenPhase) {
        self.inner
            .times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .phase_started = Some(Instant::now());
        self.inner.items.store(0, Ordering::Relaxed);
        self.inner.expected.store(UNKNOWN, Ordering::Relaxed);
        self.inner.phase.store(phase.as_u8(), Ordering::Relaxed);
    }

    /// The current phase will go through `total` readings.
    pub fn expect(&self, total: u64) {
        self.inner
            .expected
            .store(total.min(UNKNOWN - 1), Ordering::Relaxed);
    }

    pub fn add(&self, items: u64) {
        self.inner.items.fetch_add(items, Ordering::Relaxed);
    }

    pub fn finish(&self) {
        let mut times = self.inner.times.lock().unwrap_or_else(|e| e.into_inner());
        times.took = Some(times.started.map_or(Duration::ZERO, |s| s.elapsed()));
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

/// The progress line itself. The rate, readings left and ETA are left out
/// where unknown (see [`OpenState::rate`], [`OpenState::eta`]).
pub(crate) fn log_progress(dir: &std::path::Path, state: OpenState) {
    let rate = state.rate().map(|r| format!("{r:.1}"));
    tracing::info!(
        dir = %dir.display(),
        phase = state.phase.describe(),
        readings = state.items,
        readings_left = state.left(),
        readings_per_sec = rate.as_deref(),
        eta_secs = state.eta().map(|eta| eta.as_secs()),
        elapsed_secs = state.elapsed.as_secs(),
        "still opening the queue"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting(items: u64, secs: u64, expected: Option<u64>) -> OpenState {
        OpenState {
            phase: OpenPhase::Counting,
            items,
            elapsed: Duration::from_secs(secs + 7),
            phase_elapsed: Duration::from_secs(secs),
            expected,
        }
    }

    #[test]
    fn rate_left_and_eta_come_from_the_phase_so_far() {
        let state = counting(5000, 4, Some(25_000));
        assert_eq!(state.rate(), Some(1250.0));
        assert_eq!(state.left(), Some(20_000));
        assert_eq!(state.eta(), Some(Duration::from_secs(16)));
        // Without a counts record: a rate, nothing to count down.
        let state = counting(5000, 4, None);
        assert_eq!(
            (state.rate(), state.left(), state.eta()),
            (Some(1250.0), None, None)
        );
        // Nothing counted yet: no ETA from a zero rate.
        let state = counting(0, 4, Some(10));
        assert_eq!((state.rate(), state.eta()), (Some(0.0), None));
        // More found than the record said (readings pushed after it): done.
        let state = counting(30, 2, Some(20));
        assert_eq!((state.left(), state.eta()), (Some(0), Some(Duration::ZERO)));
        // Too early for a rate.
        let state = OpenState {
            phase_elapsed: Duration::from_millis(200),
            ..counting(50, 0, Some(100))
        };
        assert_eq!((state.rate(), state.eta()), (None, None));
        // sled's recovery counts nothing.
        let state = OpenState {
            phase: OpenPhase::Recovering,
            ..counting(0, 60, None)
        };
        assert_eq!(state.rate(), None);
    }

    #[test]
    fn each_phase_has_its_own_total_and_clock() {
        let progress = OpenProgress::new();
        progress.start();
        progress.enter(OpenPhase::Counting);
        progress.expect(100);
        progress.add(10);
        let state = progress.state();
        assert_eq!((state.expected, state.left()), (Some(100), Some(90)));
        std::thread::sleep(Duration::from_millis(20));
        progress.enter(OpenPhase::FinishingRemoval);
        let state = progress.state();
        assert_eq!((state.items, state.expected), (0, None));
        assert!(state.phase_elapsed < state.elapsed, "{state:?}");
    }

    /// The log line as the text format prints it.
    fn logged(state: OpenState) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            log_progress(std::path::Path::new("/q"), state)
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_progress_line_has_rate_left_and_eta_when_known() {
        let line = logged(counting(5000, 4, Some(25_000)));
        assert!(
            line.contains(
                "still opening the queue dir=/q phase=\"counting queued readings\" readings=5000 \
                 readings_left=20000 readings_per_sec=\"1250.0\" eta_secs=16 elapsed_secs=11"
            ),
            "{line}"
        );
        let line = logged(counting(5000, 4, None));
        assert!(
            line.contains("readings=5000 readings_per_sec=\"1250.0\" elapsed_secs=11"),
            "{line}"
        );
        assert!(
            !line.contains("readings_left") && !line.contains("eta_secs"),
            "{line}"
        );
    }

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
        assert_eq!(first.expected, None, "no total was given");
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
