//! Downlink: entries written to a ThingSpeak channel (a setpoint from the web
//! UI, an on/off from a MATLAB analysis) acted on locally by `[[downlink]]`
//! rules: a Modbus write (read back), a serial command, a local MQTT publish.
//!
//! ```text
//! ThingSpeak ──► forwarder's feed subscription ──► FeedHub ──► one task per channel
//!                                                                │ decide (safety checks)
//!                                                                ├─► Modbus bus task (write + read-back)
//!                                                                ├─► serial port task (command)
//!                                                                └─► local broker (publish)
//! ```
//!
//! Every entry a rule sees is counted once (`received`) and ends as
//! `applied`, `refused{reason}` or `failed{reason}`, each logged. The entry
//! id it handled is on disk (fsynced) before the next entry is looked at, so
//! a restart never applies an entry twice; a failed action is not retried
//! (the next entry is the next chance), as a replay could come late.

pub mod config;
mod decide;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use prometheus::{IntCounterVec, Opts};
use thingspeak::ChannelId;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tsgw_core::{FeedEntry, FeedSource, Metrics};
use tsgw_modbus::ModbusWriter;
use tsgw_mqtt::LocalPublisher;
use tsgw_serial::SerialWriter;

pub use config::DownlinkRule;
use decide::{decide, Command, Verdict};
use state::{Opened, State};

/// How long a channel whose feed was refused waits before asking again.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

/// Where actions go. The Modbus and serial writers change when a reload
/// restarts the devices.
#[derive(Clone, Default)]
pub struct Targets {
    inner: Arc<RwLock<(ModbusWriter, SerialWriter)>>,
    mqtt: Option<LocalPublisher>,
}

impl Targets {
    pub fn new(mqtt: Option<LocalPublisher>) -> Self {
        Self {
            inner: Arc::default(),
            mqtt,
        }
    }

    /// The devices' writers after they were (re)started.
    pub fn set_devices(&self, modbus: ModbusWriter, serial: SerialWriter) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = (modbus, serial);
    }

    fn writers(&self) -> (ModbusWriter, SerialWriter) {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `command`; the error is the `failed` reason and the message.
    async fn run(&self, command: Command) -> Result<(), (&'static str, String)> {
        match command {
            Command::Modbus { device, value } => {
                let (modbus, _) = self.writers();
                modbus
                    .write(&device, value)
                    .await
                    .map_err(|e| (e.reason(), e.to_string()))
            }
            Command::Serial {
                port,
                bytes,
                within,
            } => {
                let (_, serial) = self.writers();
                serial
                    .send(&port, bytes, within)
                    .await
                    .map_err(|e| (e.reason(), e.to_string()))
            }
            Command::Mqtt { topic, payload } => match &self.mqtt {
                Some(publisher) => publisher
                    .publish(&topic, payload)
                    .map_err(|e| ("local_broker", e)),
                None => Err(("local_broker", "the local broker is not running".into())),
            },
        }
    }
}

#[derive(Clone)]
struct DownlinkMetrics {
    received: IntCounterVec,
    applied: IntCounterVec,
    refused: IntCounterVec,
    failed: IntCounterVec,
}

impl DownlinkMetrics {
    fn new(metrics: &Metrics) -> Self {
        let family = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            if let Err(e) = metrics.registry().register(Box::new(c.clone())) {
                tracing::debug!(error = %e, "downlink metric already registered");
            }
            c
        };
        Self {
            received: family(
                "tsgw_downlink_received_total",
                "Channel entries a downlink rule looked at (the entry sets its source)",
                &["rule"],
            ),
            applied: family(
                "tsgw_downlink_applied_total",
                "Downlink actions done (a Modbus write read back, a serial command written, a local publish handed over)",
                &["rule"],
            ),
            refused: family(
                "tsgw_downlink_refused_total",
                "Downlink entries refused by a safety check",
                &["rule", "reason"],
            ),
            failed: family(
                "tsgw_downlink_failed_total",
                "Downlink actions that failed",
                &["rule", "reason"],
            ),
        }
    }
}

/// What the channel tasks share.
struct Shared {
    state: Mutex<State>,
    /// Per target: when it was last acted on.
    last_action: Mutex<HashMap<String, Instant>>,
    metrics: DownlinkMetrics,
    targets: Targets,
    /// The state file could not be read: entries delivered on subscribing
    /// are skipped (they may have been applied before).
    distrust_initial: bool,
}

/// Where the rules' state is kept: next to the queue, in its parent directory
/// (`/var/lib/tsgw/downlink-state.json` by default).
pub fn state_path(queue_dir: &std::path::Path) -> PathBuf {
    queue_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .join("downlink-state.json")
}

/// Starts one task per channel the rules read. Nothing starts without rules.
pub fn spawn(
    rules: &[DownlinkRule],
    feeds: Arc<dyn FeedSource>,
    targets: Targets,
    state_file: PathBuf,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    if rules.is_empty() {
        return Vec::new();
    }
    let (state, distrust_initial) = match State::open(&state_file) {
        Opened::Fresh(state) => (state, false),
        Opened::Unreadable(state, why) => {
            error!(
                file = %state_file.display(),
                "downlink state unreadable ({why}): entries delivered on subscribing are \
                 skipped, in case they were applied before; later ones are acted on"
            );
            (state, true)
        }
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        last_action: Mutex::new(HashMap::new()),
        metrics: DownlinkMetrics::new(metrics),
        targets,
        distrust_initial,
    });
    let mut by_channel: BTreeMap<ChannelId, Vec<DownlinkRule>> = BTreeMap::new();
    for rule in rules {
        by_channel
            .entry(rule.channel)
            .or_default()
            .push(rule.clone());
        // Visible at 0 before the first entry.
        shared
            .metrics
            .received
            .with_label_values(&[&rule.name])
            .inc_by(0);
        shared
            .metrics
            .applied
            .with_label_values(&[&rule.name])
            .inc_by(0);
    }
    by_channel
        .into_iter()
        .map(|(channel, rules)| {
            tokio::spawn(run_channel(
                channel,
                rules,
                feeds.clone(),
                shared.clone(),
                shutdown.clone(),
            ))
        })
        .collect()
}

async fn run_channel(
    channel: ChannelId,
    rules: Vec<DownlinkRule>,
    feeds: Arc<dyn FeedSource>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let mut tap = loop {
        let asked = tokio::select! {
            _ = shutdown.cancelled() => return,
            asked = feeds.subscribe(channel, None) => asked,
        };
        match asked {
            Ok(tap) => break tap,
            Err(refusal) => {
                error!(%channel, rules = ?names, reason = refusal.reason,
                    "downlink rules get nothing: {}; asking again in {RETRY_REFUSED:?}", refusal.message);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_REFUSED) => {}
                }
            }
        }
    };
    info!(%channel, rules = ?names, "downlink rules follow the channel's feed");
    // The first entry delivered is the channel's newest at subscribing.
    let mut initial = true;
    let mut next = tap.last.take();
    loop {
        let entry = match next.take() {
            Some(entry) => entry,
            None => {
                let got = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = tap.entries.recv() => got,
                };
                match got {
                    Ok(entry) => entry,
                    Err(RecvError::Lagged(n)) => {
                        warn!(%channel, missed = n, "downlink fell behind the channel's feed; the newest entries are acted on");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        };
        let skip = initial && shared.distrust_initial;
        initial = false;
        for rule in &rules {
            handle(rule, &entry, skip, &shared).await;
        }
    }
}

/// One rule, one entry: decide, act, count, log, remember.
async fn handle(rule: &DownlinkRule, entry: &FeedEntry, skip: bool, shared: &Shared) {
    let m = &shared.metrics;
    let name = rule.name.as_str();
    let last = shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .last_handled(name);
    let target = rule.target_key();
    let since = shared
        .last_action
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&target)
        .map(Instant::elapsed);
    let verdict = if skip {
        match decide(rule, &entry.entry, last, since, Utc::now()) {
            Verdict::Ignore => Verdict::Ignore,
            _ => Verdict::Refuse {
                reason: "state_unreadable",
                message: "delivered on subscribing while the downlink state file was unreadable: it may have been applied before".into(),
            },
        }
    } else {
        decide(rule, &entry.entry, last, since, Utc::now())
    };
    let entry_id = entry.entry_id;
    let value = entry.entry.get(rule.source).unwrap_or_default().to_owned();
    match verdict {
        Verdict::Ignore => return,
        Verdict::Refuse { reason, message } => {
            m.received.with_label_values(&[name]).inc();
            m.refused.with_label_values(&[name, reason]).inc();
            warn!(rule = name, channel = %rule.channel, entry_id, value = %value, reason, "downlink refused: {message}");
        }
        Verdict::Apply(command) => {
            m.received.with_label_values(&[name]).inc();
            shared
                .last_action
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(target.clone(), Instant::now());
            match shared.targets.run(command).await {
                Ok(()) => {
                    m.applied.with_label_values(&[name]).inc();
                    info!(rule = name, channel = %rule.channel, entry_id, value = %value, target = %target, "downlink applied");
                }
                Err((reason, message)) => {
                    m.failed.with_label_values(&[name, reason]).inc();
                    warn!(rule = name, channel = %rule.channel, entry_id, value = %value, target = %target, reason, "downlink failed: {message}");
                }
            }
        }
    }
    let saved = shared
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .handled(name, entry_id);
    if let Err(e) = saved {
        // Counted and logged loudly: a restart could act on this entry again.
        m.failed.with_label_values(&[name, "state_write"]).inc();
        error!(rule = name, entry_id, error = %e, "cannot record the handled entry on disk; a restart may act on it again");
    }
}
