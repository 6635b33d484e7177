//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` (JSON saying
//! why), and the status page and tail feed (`/`, `/tail`: [`super::status`]).

use std::net::SocketAddr;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use tsgw_core::Metrics;

use super::health::{Health, Report};
use super::status::StatusService;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

/// Binds now (so a taken port fails startup with the key named) and serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    metrics: Metrics,
    health: Health,
    status: StatusService,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (http.listen)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
        .merge(status.router());
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(bound)
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    respond(state.health.liveness())
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    respond(state.health.readiness())
}

fn respond(report: Report) -> impl IntoResponse {
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}
