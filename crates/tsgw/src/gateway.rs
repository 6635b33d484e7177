//! Starts the pipeline, runs it until a stop signal, and stops it without losing data.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tsgw_core::{ChannelId, Metrics, Reading, ReadingStore};
use tsgw_mqtt::MqttSource;
use tsgw_queue::{DurableQueue, OpenProgress};

use crate::config::GatewayConfig;
use crate::ops::health::Health;
use crate::ops::status::StatusService;
use crate::ops::{http, systemd};
use crate::pipeline::heartbeat::Heartbeat;
use crate::pipeline::writer;

/// Bound of the channel between the polled sources (serial, Modbus) and the
/// queue writer, in readings. Polled devices produce a few readings a second;
/// when the writer is behind they wait.
const READING_CHANNEL: usize = 1024;

/// Bound of the channel between the MQTT front and the queue writer, in
/// batches of one device read (at most 16 KiB of publishes) each: with
/// readings of about 100 bytes in memory, a few MiB at most. When it is full
/// the front stops reading device sockets and TCP pushes back on the devices.
const MQTT_BATCH_CHANNEL: usize = 32;

/// How long a clean stop waits for sources to hand over their last readings.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A started gateway. Dropping it does not stop it: call [`Gateway::shutdown`].
pub struct Gateway {
    config: GatewayConfig,
    metrics: Metrics,
    queue: DurableQueue,
    mqtt: MqttSource,
    readings: mpsc::Sender<Reading>,
    polled_devices: PolledDevices,
    downlink: Downlink,
    writer: JoinHandle<()>,
    forwarder: JoinHandle<()>,
    flusher: JoinHandle<()>,
    // Read by the demo only (it prints where to look).
    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    http_addr: SocketAddr,
    status: StatusService,
    /// Cancels the sources (first, so their last readings reach the queue).
    sources_stop: CancellationToken,
    /// Cancels the forwarder, HTTP endpoint, flusher and watchdog (last).
    service_stop: CancellationToken,
}

/// Serial and Modbus pollers; replaced as a group on reload.
struct PolledDevices {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Downlink rules and where their actions go; replaced as a group on reload.
struct Downlink {
    targets: crate::downlink::Targets,
    feeds: Arc<dyn tsgw_core::FeedSource>,
    state_file: PathBuf,
    metrics: Metrics,
    sources_stop: CancellationToken,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Downlink {
    fn start(&mut self, rules: &[crate::downlink::DownlinkRule]) {
        self.stop = self.sources_stop.child_token();
        self.tasks = crate::downlink::spawn(
            rules,
            self.feeds.clone(),
            self.targets.clone(),
            self.state_file.clone(),
            &self.metrics,
            self.stop.clone(),
        );
    }

    /// Stops the rules' tasks between entries: an action under way finishes
    /// and is recorded, so the next run neither repeats nor loses it.
    async fn stop(&mut self) {
        self.stop.cancel();
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                warn!("a downlink action did not finish within 5 s; stopping it");
                abort.abort();
            }
        }
    }
}

impl Gateway {
    pub async fn start(config: GatewayConfig) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let sources_stop = CancellationToken::new();
        let service_stop = CancellationToken::new();

        // The HTTP listener comes first, so that the status page shows how
        // far opening a large queue got.
        let heartbeat = Heartbeat::new();
        heartbeat.beat();
        let opening = OpenProgress::new();
        // ThingSpeak's channel feeds, subscribed on the forwarder's
        // connections, for drop-in subscribers and downlink rules.
        let feeds = tsgw_forwarder::FeedHub::new(&config.upstream, &metrics);
        let health = Health::new(
            heartbeat.clone(),
            metrics.clone(),
            Duration::from_secs(config.http.ready_upstream_grace_secs),
        )
        .with_queue_opening(opening.clone())
        .with_feeds(feeds.clone());
        let status = StatusService::new(
            &config,
            metrics.clone(),
            opening.clone(),
            service_stop.clone(),
        );
        let http_addr = http::serve(
            config.http.listen,
            metrics.clone(),
            health.clone(),
            status.clone(),
            service_stop.clone(),
        )
        .await?;
        info!(addr = %http_addr, "metrics and health endpoint ready");
        if config.http.users.is_empty() && !config.http.listen.ip().is_loopback() {
            warn!(listen = %config.http.listen, "the status page and tail feed are open to anyone who reaches http.listen; add http.users to require a password");
        }
        status.spawn_sampler();

        let queue = {
            let (config, metrics) = (config.queue.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || {
                DurableQueue::open_with_progress(&config, metrics, &opening)
            })
            .await
            .context("opening the queue stopped")
            .and_then(|opened| opened.map_err(anyhow::Error::from))
        };
        let queue = queue
            .with_context(|| {
                format!(
                    "cannot open the queue at {} (queue.dir)",
                    config.queue.dir.display()
                )
            })
            .inspect_err(|_| service_stop.cancel())?;
        info!(
            dir = %config.queue.dir.display(),
            readings = queue.len(),
            bytes = queue.bytes(),
            "queue open"
        );
        status.set_queue(Arc::new(queue.clone()));
        let flusher = queue.spawn_flusher(service_stop.clone());

        let (readings, readings_rx) = mpsc::channel(READING_CHANNEL);
        let (mqtt_batches, mqtt_batches_rx) = mpsc::channel(MQTT_BATCH_CHANNEL);
        let writer = tokio::spawn(writer::run(
            writer::Inputs {
                polled: readings_rx,
                mqtt: mqtt_batches_rx,
            },
            queue.clone(),
            metrics.clone(),
            heartbeat,
            status.recent.clone(),
        ));

        let mqtt = MqttSource::start_with_feeds(
            &config.mqtt,
            &upstream_channels(&config),
            mqtt_batches,
            Some(Arc::new(feeds.clone())),
            metrics.clone(),
            sources_stop.clone(),
        )
        .await
        .context("cannot start the local MQTT broker")?;

        let targets = crate::downlink::Targets::new(Some(mqtt.local_publisher()));
        let polled_devices =
            spawn_polled_devices(&config, &readings, &metrics, &sources_stop, &targets)?;
        let mut downlink = Downlink {
            targets,
            feeds: Arc::new(feeds.clone()),
            state_file: crate::downlink::state_path(&config.queue.dir),
            metrics: metrics.clone(),
            sources_stop: sources_stop.clone(),
            stop: sources_stop.child_token(),
            tasks: Vec::new(),
        };
        downlink.start(&config.downlink);

        let store: Arc<dyn ReadingStore> = Arc::new(queue.clone());
        let forwarder = {
            let upstream = config.upstream.clone();
            let metrics = metrics.clone();
            let stop = service_stop.clone();
            let feeds = feeds.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    tsgw_forwarder::run_with_feeds(upstream, store, metrics, feeds, stop).await
                {
                    error!(error = %e, "the forwarder stopped: nothing will be sent upstream until the gateway restarts");
                }
            })
        };

        systemd::spawn_watchdog(health, service_stop.clone());
        systemd::ready();
        info!(
            mqtt = ?mqtt.addrs().plain,
            serial_ports = config.serial.len(),
            modbus_devices = config.modbus.len(),
            upstream = %config.upstream.host,
            "gateway running"
        );
        Ok(Self {
            config,
            metrics,
            queue,
            mqtt,
            readings,
            polled_devices,
            downlink,
            writer,
            forwarder,
            flusher,
            http_addr,
            status,
            sources_stop,
            service_stop,
        })
    }

    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt.addrs().plain
    }

    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Applies a new config's mapping rules and devices. Sections that need a
    /// restart (queue, upstream, listeners, HTTP) are reported, not applied.
    /// The queue is untouched, so nothing queued is lost.
    pub async fn reload(&mut self, new: GatewayConfig) -> anyhow::Result<()> {
        new.validate()?;
        self.mqtt
            .reload_mapping(&new.mqtt, &upstream_channels(&new))
            .context("invalid [mqtt] section")?;
        // Stop the old pollers before starting new ones: serial ports are
        // opened exclusively, so the new task could not open a port the old
        // one still holds.
        self.polled_devices.stop.cancel();
        for task in self.polled_devices.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.polled_devices = spawn_polled_devices(
            &new,
            &self.readings,
            &self.metrics,
            &self.sources_stop,
            &self.downlink.targets,
        )?;
        if new.downlink != self.config.downlink {
            // The devices they write to were restarted above; the handled
            // entry ids stay on disk, so nothing is applied twice.
            self.downlink.stop().await;
            self.downlink.start(&new.downlink);
            info!(rules = new.downlink.len(), "downlink rules reloaded");
        }
        self.status.reconfigure(&new);
        for (section, changed) in [
            ("queue", toml_of(&new.queue) != toml_of(&self.config.queue)),
            (
                "upstream",
                toml_of(&new.upstream) != toml_of(&self.config.upstream),
            ),
            // http.users apply at once (the status page re-reads them).
            (
                "http",
                (
                    new.http.listen,
                    new.http.ready_upstream_grace_secs,
                    new.http.refresh_secs,
                ) != (
                    self.config.http.listen,
                    self.config.http.ready_upstream_grace_secs,
                    self.config.http.refresh_secs,
                ),
            ),
            (
                "mqtt listeners",
                (new.mqtt.listen, new.mqtt.websocket_listen, &new.mqtt.tls)
                    != (
                        self.config.mqtt.listen,
                        self.config.mqtt.websocket_listen,
                        &self.config.mqtt.tls,
                    ),
            ),
        ] {
            if changed {
                warn!(
                    section,
                    "changed in the config, but only applied at the next restart"
                );
            }
        }
        info!(
            rules = new.mqtt.rules.len(),
            serial_ports = new.serial.len(),
            modbus_devices = new.modbus.len(),
            "config reloaded"
        );
        self.config = new;
        Ok(())
    }

    /// Stops sources first, stores what they produced, flushes the queue,
    /// then stops the forwarder.
    pub async fn shutdown(self) {
        systemd::stopping();
        info!("stopping: draining sources into the queue");
        self.sources_stop.cancel();
        self.polled_devices.stop.cancel();
        drop(self.readings);
        let mut downlink = self.downlink;
        downlink.stop().await;
        drop(self.mqtt);
        if tokio::time::timeout(DRAIN_TIMEOUT, self.writer)
            .await
            .is_err()
        {
            warn!("sources did not stop within {DRAIN_TIMEOUT:?}; stopping anyway");
        }
        if let Err(e) = self.queue.flush().await {
            error!(error = %e, "final queue flush failed");
        }
        self.service_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.forwarder).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flusher).await;
        info!(queued = self.queue.len(), "stopped; queue flushed");
    }
}

fn spawn_polled_devices(
    config: &GatewayConfig,
    readings: &mpsc::Sender<Reading>,
    metrics: &Metrics,
    sources_stop: &CancellationToken,
    targets: &crate::downlink::Targets,
) -> anyhow::Result<PolledDevices> {
    let stop = sources_stop.child_token();
    let (mut tasks, serial) = tsgw_serial::spawn_ports_with_writer(
        &config.serial,
        readings.clone(),
        metrics.clone(),
        stop.clone(),
    )
    .context("cannot start [[serial]] ports")?;
    let (modbus_tasks, modbus) = tsgw_modbus::spawn_devices_with_writer(
        &config.modbus,
        readings.clone(),
        metrics.clone(),
        stop.clone(),
    )
    .context("cannot start [[modbus]] devices")?;
    tasks.extend(modbus_tasks);
    // Downlink actions go to the devices as they run now.
    targets.set_devices(modbus, serial);
    Ok(PolledDevices { stop, tasks })
}

/// The channels the upstream config names: `[upstream.channels.<id>]` and the
/// channels of `[[upstream.connections]]`. Drop-in publishes may write only
/// these unless `mqtt.drop_in.channels` lists others.
fn upstream_channels(config: &GatewayConfig) -> BTreeSet<ChannelId> {
    config
        .upstream
        .channels
        .keys()
        .filter_map(|id| id.parse::<u64>().ok().and_then(|n| ChannelId::new(n).ok()))
        .chain(config.upstream.listed_channels())
        .collect()
}

fn toml_of<T: serde::Serialize>(value: &T) -> String {
    toml::to_string(value).unwrap_or_default()
}

/// Runs the gateway from a config file until SIGTERM or SIGINT; SIGHUP reloads.
pub async fn run_until_stopped(config_path: PathBuf, config: GatewayConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;

    let mut gateway = Gateway::start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM received"); break; }
            _ = int.recv() => { info!("SIGINT received"); break; }
            _ = hup.recv() => {
                info!(path = %config_path.display(), "SIGHUP received: reloading the config");
                let result = match GatewayConfig::load(&config_path) {
                    Ok(new) => gateway.reload(new).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => gateway.metrics().config_reloads_total.with_label_values(&["applied"]).inc(),
                    Err(e) => {
                        gateway.metrics().config_reloads_total.with_label_values(&["rejected"]).inc();
                        error!(error = format!("{e:#}"), "new config rejected; the running config stays in force");
                    }
                }
            }
        }
    }
    gateway.shutdown().await;
    Ok(())
}
