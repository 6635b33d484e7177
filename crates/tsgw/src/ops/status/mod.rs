//! The status page (`GET /`) and the live feed behind `tsgw tail`
//! (`GET /tail`), on the gateway's HTTP listener.
//!
//! ```text
//! writer ──stored batches──► recent (devices' last values, plot buckets, tail feed)
//! metrics registry ──every 10 s──► history (last hour of counters, backfill rate)
//! registry + recent + history + queue + config ──► snapshot ──► page (HTML + SVG)
//! ```
//! Read-only: nothing here changes the pipeline. Behind `http.users` when
//! configured (HTTP Basic, passwords as for `[mqtt.users]`).

pub mod auth;
mod disk;
mod families;
mod history;
pub mod page;
mod plot;
pub mod recent;
mod snapshot;
pub mod tail;

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tsgw_core::{ChannelId, Metrics, ReadingStore, SourceKind};
use tsgw_queue::OpenProgress;

use crate::config::GatewayConfig;
use auth::Users;
use families::Families;
use history::History;
use recent::RecentReadings;
use snapshot::ConfiguredView;

/// The status page and tail feed, and what they read.
#[derive(Clone)]
pub struct StatusService {
    metrics: Metrics,
    pub recent: RecentReadings,
    history: History,
    configured: Arc<RwLock<ConfiguredView>>,
    users: Arc<RwLock<Users>>,
    refresh: Duration,
    queue: Arc<OnceLock<Arc<dyn ReadingStore>>>,
    opening: OpenProgress,
    started: DateTime<Utc>,
    shutdown: CancellationToken,
    /// Slots for `/tail` followers.
    followers: Arc<tokio::sync::Semaphore>,
}

impl StatusService {
    /// `opening` is the queue's open progress, shown until [`set_queue`](Self::set_queue).
    pub fn new(
        config: &GatewayConfig,
        metrics: Metrics,
        opening: OpenProgress,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            metrics,
            recent: RecentReadings::new(),
            history: History::default(),
            configured: Arc::new(RwLock::new(configured_view(config))),
            users: Arc::new(RwLock::new(Users::new(config.http.users.clone()))),
            refresh: Duration::from_secs(config.http.refresh_secs),
            queue: Arc::new(OnceLock::new()),
            opening,
            started: Utc::now(),
            shutdown,
            followers: Arc::new(tokio::sync::Semaphore::new(tail::MAX_FOLLOWERS)),
        }
    }

    /// The queue, once open: channel backlogs and oldest readings come from it.
    pub fn set_queue(&self, queue: Arc<dyn ReadingStore>) {
        let _ = self.queue.set(queue);
    }

    /// A reloaded config: its devices, channels and `http.users` apply at once.
    pub fn reconfigure(&self, config: &GatewayConfig) {
        *self.configured.write().unwrap_or_else(|e| e.into_inner()) = configured_view(config);
        *self.users.write().unwrap_or_else(|e| e.into_inner()) =
            Users::new(config.http.users.clone());
    }

    /// `/` and `/tail`, behind `http.users` when there are any.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(page_handler))
            .route("/tail", get(tail::handler))
            .layer(middleware::from_fn_with_state(self.clone(), require_user))
            .with_state(self.clone())
    }

    /// Samples the registry for the counters' history until shutdown.
    pub fn spawn_sampler(&self) {
        let service = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(history::TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = service.shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let families = Families::gather(&service.metrics);
                service.history.tick(&families, Utc::now());
            }
        });
    }

    fn render(&self) -> String {
        let now = Utc::now();
        let families = Families::gather(&self.metrics);
        let recent = self.recent.snapshot(now);
        let configured = self
            .configured
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let queue = self.queue.get().map(|q| q.as_ref());
        let disk = disk::usage(&configured.queue_dir);
        let page = snapshot::collect(&snapshot::Inputs {
            now,
            started: self.started,
            families: &families,
            recent: &recent,
            history: &self.history,
            configured: &configured,
            queue,
            open: self.opening.state(),
            disk,
        });
        page::render(&page, self.refresh)
    }
}

async fn page_handler(State(service): State<StatusService>) -> Response {
    // Reading the queue touches the disk: off the async threads.
    match tokio::task::spawn_blocking(move || service.render()).await {
        Ok(html) => ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering the status page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the status page failed; see the log",
            )
                .into_response()
        }
    }
}

async fn require_user(
    State(service): State<StatusService>,
    request: Request,
    next: Next,
) -> Response {
    let users = service
        .users
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if users.is_empty() {
        return next.run(request).await;
    }
    match users
        .check(request.headers().get(header::AUTHORIZATION))
        .await
    {
        Ok(_) => next.run(request).await,
        Err(denied) => {
            service
                .metrics
                .http_denied_total
                .with_label_values(&[denied.reason()])
                .inc();
            (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"tsgw\", charset=\"UTF-8\"",
                )],
                "this page needs a user from http.users\n",
            )
                .into_response()
        }
    }
}

fn configured_view(config: &GatewayConfig) -> ConfiguredView {
    let mut devices = BTreeSet::new();
    for port in &config.serial {
        devices.insert((SourceKind::Serial, port.name.clone()));
    }
    for unit in &config.modbus {
        devices.insert((SourceKind::Modbus, unit.name.clone()));
    }
    for rule in &config.mqtt.rules {
        devices.insert((SourceKind::Mqtt, rule.name.clone()));
    }
    for user in config.mqtt.users.keys() {
        devices.insert((SourceKind::Mqtt, user.clone()));
    }
    let channels = config
        .upstream
        .channels
        .keys()
        .filter_map(|id| id.parse::<u64>().ok().and_then(|n| ChannelId::new(n).ok()))
        .chain(config.upstream.listed_channels())
        .collect();
    ConfiguredView {
        devices,
        channels,
        queue_dir: config.queue.dir.clone(),
        queue_max_bytes: config.queue.max_bytes,
    }
}
