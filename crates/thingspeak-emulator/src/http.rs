//! The HTTP side: ThingSpeak's REST writes (`/update.json`, `bulk_update.json`)
//! and the emulator's own inspection and fault-injection API under `/api`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use thingspeak::{BulkError, BulkUpdateRequest, ChannelId, License, UpdateRequest};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::core::Core;
use crate::counters::LiveCounters;
use crate::faults::RefuseMode;
use crate::feeds;
use crate::state::{BulkRejected, BulkTime, BulkUpdate, WriteOrigin};

/// Serves `app` over TLS until shutdown: the same API as the plain listener,
/// for clients that insist on `https://` like the real `api.thingspeak.com`.
pub(crate) async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    core: Arc<Core>,
) {
    loop {
        let accepted = tokio::select! {
            _ = core.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, app, core) = (acceptor.clone(), app.clone(), core.clone());
        tokio::spawn(async move {
            let timeout = core.session.handshake_timeout;
            let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "HTTPS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "HTTPS handshake timed out");
                    return;
                }
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = core.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "HTTPS connection ended with an error");
            }
        });
    }
}

pub(crate) fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/update", get(update_text).post(update_text))
        .route("/update.json", get(update_json).post(update_json))
        .route("/channels/:id/bulk_update.json", post(bulk_update))
        .route("/channels/:id/feeds.json", get(feeds::feeds))
        .route("/channels/:id/feeds/last.json", get(feeds::last))
        .route("/api/channels", get(list_channels))
        .route("/api/channels/:id/entries", get(list_entries))
        .route("/api/counters", get(counters))
        .route("/api/faults", get(fault_status).delete(clear_faults))
        .route("/api/faults/refuse-connections", post(refuse_connections))
        .route("/api/faults/drop-connections", post(drop_connections))
        .route("/api/faults/drop-publishes", post(drop_publishes))
        .with_state(core)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    (
        status,
        Json(json!({ "status": status.as_u16(), "error": message })),
    )
        .into_response()
}

// ---- ThingSpeak REST -------------------------------------------------------

async fn update_text(
    State(core): State<Arc<Core>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    single_update(&core, &uri, &headers, &body, false)
}

async fn update_json(
    State(core): State<Arc<Core>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    single_update(&core, &uri, &headers, &body, true)
}

/// `/update` answers the new entry id as text, `/update.json` the entry as JSON;
/// both answer `0` when the update is not stored, as ThingSpeak does.
fn single_update(
    core: &Core,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    json_reply: bool,
) -> Response {
    LiveCounters::inc(&core.counters.update_calls);
    let rejected = |status: StatusCode, reason: String| {
        LiveCounters::inc(&core.counters.update_rejected);
        info!(%reason, "update.json rejected");
        (status, "0").into_response()
    };
    let form = match request_form(uri, headers, body) {
        Ok(f) => f,
        Err(reason) => return rejected(StatusCode::BAD_REQUEST, reason),
    };
    let req = match UpdateRequest::parse_form(form.as_bytes()) {
        Ok(r) => r,
        Err(e) => return rejected(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let channel = {
        let store = core.store();
        store.channel_ids().into_iter().find(|id| {
            store
                .channel(*id)
                .is_some_and(|c| c.write_key == req.api_key.expose())
        })
    };
    let Some(channel) = channel else {
        return rejected(
            StatusCode::UNAUTHORIZED,
            "api_key matches no channel".into(),
        );
    };
    match core.write(channel, &req.update, WriteOrigin::UpdateApi) {
        Ok(entry) if json_reply => Json(entry.data).into_response(),
        Ok(entry) => entry.entry_id().to_string().into_response(),
        Err(e) => rejected(StatusCode::OK, e.to_string()),
    }
}

/// Collects the parameters of an update request as one form string: the query
/// string, then the body (form-encoded, or a JSON object), then the
/// `X-THINGSPEAKAPIKEY` header if no `api_key` was given otherwise.
fn request_form(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Result<String, String> {
    let mut parts: Vec<String> = Vec::new();
    if let Some(q) = uri.query().filter(|q| !q.is_empty()) {
        parts.push(q.to_owned());
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
        let obj = value.as_object().ok_or("JSON body must be an object")?;
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::Null => continue,
                _ => return Err(format!("parameter {k:?} must be a string or a number")),
            };
            ser.append_pair(k, &text);
        }
        parts.push(ser.finish());
    } else if !body.is_empty() {
        parts.push(
            std::str::from_utf8(body)
                .map_err(|_| "body is not UTF-8".to_string())?
                .to_owned(),
        );
    }
    let mut form = parts.join("&");
    let has_key = form_urlencoded::parse(form.as_bytes()).any(|(k, _)| k == "api_key");
    if !has_key {
        if let Some(key) = headers
            .get("x-thingspeakapikey")
            .and_then(|v| v.to_str().ok())
        {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            ser.append_pair("api_key", key);
            if !form.is_empty() {
                form.push('&');
            }
            form.push_str(&ser.finish());
        }
    }
    Ok(form)
}

async fn bulk_update(
    State(core): State<Arc<Core>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    LiveCounters::inc(&core.counters.bulk_calls);
    let response = bulk_update_inner(&core, &id, &body);
    if !response.status().is_success() {
        LiveCounters::inc(&core.counters.bulk_rejected);
    }
    response
}

fn bulk_update_inner(core: &Core, id: &str, body: &[u8]) -> Response {
    let Ok(channel) = id.parse::<ChannelId>() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("channel {id:?} does not exist"),
        );
    };
    let (write_key, max) = {
        let store = core.store();
        match store.channel(channel) {
            Some(spec) => (spec.write_key.clone(), store.limits().max_bulk_updates),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("channel {channel} does not exist"),
                )
            }
        }
    };
    let req: BulkUpdateRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bulk_update body: {e}")),
    };
    if req.write_api_key.expose() != write_key {
        return error(
            StatusCode::UNAUTHORIZED,
            format!("write_api_key is not channel {channel}'s"),
        );
    }
    if req.updates.len() > max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} updates in one call; at most {max} allowed",
                req.updates.len()
            ),
        );
    }
    // Per-entry rules; the size limit is this emulator's (checked above and by the store).
    match req.validate(License::Paid) {
        Ok(()) => {}
        Err(e @ BulkError::TooMany { .. }) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    }
    let updates: Vec<BulkUpdate> = req
        .updates
        .iter()
        .map(|u| BulkUpdate {
            time: match (u.created_at, u.delta_t) {
                (Some(t), _) => BulkTime::At(t),
                (None, d) => BulkTime::Delta(d.unwrap_or(f64::NAN)),
            },
            values: u.values(),
        })
        .collect();
    let outcome = core
        .store()
        .bulk(channel, &updates, Instant::now(), Utc::now());
    match outcome {
        Ok(o) => {
            LiveCounters::add(&core.counters.bulk_entries, o.stored as u64);
            LiveCounters::add(
                &core.counters.rejected_duplicate_timestamp,
                o.duplicates as u64,
            );
            info!(%channel, stored = o.stored, duplicates = o.duplicates, "bulk update accepted");
            (StatusCode::ACCEPTED, Json(json!({ "success": true }))).into_response()
        }
        Err(e) => {
            debug!(%channel, reason = %e, "bulk update rejected");
            let status = match e {
                BulkRejected::UnknownChannel(_) => StatusCode::NOT_FOUND,
                BulkRejected::TooFrequent { .. } => StatusCode::TOO_MANY_REQUESTS,
                BulkRejected::TooMany { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                BulkRejected::Empty | BulkRejected::BadDelta { .. } => StatusCode::BAD_REQUEST,
            };
            error(status, e.to_string())
        }
    }
}

// ---- inspection --------------------------------------------------------------

async fn list_channels(State(core): State<Arc<Core>>) -> Response {
    let store = core.store();
    let list: Vec<_> = store
        .channel_ids()
        .into_iter()
        .map(|id| {
            json!({
                "id": id.get(),
                "entries": store.entries(id).map_or(0, <[_]>::len),
                "interval_ms": store.interval(id).map_or(0, |d| d.as_millis() as u64),
                "public": store.channel(id).is_some_and(|c| c.read_key.is_none()),
            })
        })
        .collect();
    Json(list).into_response()
}

async fn list_entries(State(core): State<Arc<Core>>, Path(id): Path<String>) -> Response {
    let Ok(channel) = id.parse::<ChannelId>() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("channel {id:?} does not exist"),
        );
    };
    let store = core.store();
    match store.entries(channel) {
        Some(entries) => Json(entries).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("channel {channel} does not exist"),
        ),
    }
}

async fn counters(State(core): State<Arc<Core>>) -> Response {
    Json(core.counters.snapshot()).into_response()
}

async fn fault_status(State(core): State<Arc<Core>>) -> Response {
    Json(core.faults.status()).into_response()
}

async fn clear_faults(State(core): State<Arc<Core>>) -> Response {
    core.faults.clear();
    info!("faults cleared");
    Json(core.faults.status()).into_response()
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("body: {e}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefuseBody {
    seconds: f64,
    #[serde(default)]
    mode: RefuseMode,
}

async fn refuse_connections(State(core): State<Arc<Core>>, body: Bytes) -> Response {
    let b: RefuseBody = match parse_body(&body) {
        Ok(b) => b,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let Ok(d) = Duration::try_from_secs_f64(b.seconds) else {
        return error(
            StatusCode::BAD_REQUEST,
            "seconds must be a non-negative number",
        );
    };
    core.faults.refuse_for(d, b.mode);
    info!(seconds = b.seconds, mode = ?b.mode, "refusing connections (fault injection)");
    Json(core.faults.status()).into_response()
}

async fn drop_connections(State(core): State<Arc<Core>>) -> Response {
    core.drop_all_connections();
    info!("dropping all connections (fault injection)");
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DropBody {
    #[serde(default)]
    count: Option<u64>,
    #[serde(default)]
    probability: Option<f64>,
}

async fn drop_publishes(State(core): State<Arc<Core>>, body: Bytes) -> Response {
    let b: DropBody = match parse_body(&body) {
        Ok(b) => b,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if b.count.is_none() && b.probability.is_none() {
        return error(StatusCode::BAD_REQUEST, "give count and/or probability");
    }
    if let Some(p) = b.probability {
        if !(0.0..=1.0).contains(&p) {
            return error(StatusCode::BAD_REQUEST, "probability must be within 0..1");
        }
        core.faults.set_drop_probability(p);
    }
    if let Some(n) = b.count {
        core.faults.drop_next(n);
    }
    info!(count = ?b.count, probability = ?b.probability, "dropping publishes (fault injection)");
    Json(core.faults.status()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn query_and_form_body_are_joined() {
        let uri: Uri = "/update.json?api_key=K".parse().unwrap();
        let form = request_form(&uri, &HeaderMap::new(), b"field1=1").unwrap();
        assert_eq!(form, "api_key=K&field1=1");
    }

    #[test]
    fn json_body_becomes_form_parameters() {
        let uri: Uri = "/update.json".parse().unwrap();
        let h = headers(&[("content-type", "application/json; charset=utf-8")]);
        let form =
            request_form(&uri, &h, br#"{"api_key":"K","field2":2.5,"status":null}"#).unwrap();
        let req = UpdateRequest::parse_form(form.as_bytes()).unwrap();
        assert_eq!(req.api_key.expose(), "K");
        assert_eq!(req.update.get("field2".parse().unwrap()), Some("2.5"));
        let err = request_form(&uri, &h, br#"{"field1":[1]}"#).unwrap_err();
        assert!(err.contains("field1"), "{err}");
        assert!(request_form(&uri, &h, b"[1]").is_err());
    }

    #[test]
    fn the_api_key_header_is_used_when_no_parameter_gives_one() {
        let uri: Uri = "/update".parse().unwrap();
        let h = headers(&[("x-thingspeakapikey", "HDR")]);
        let form = request_form(&uri, &h, b"field1=1").unwrap();
        assert_eq!(form, "field1=1&api_key=HDR");
        let form = request_form(&uri, &h, b"api_key=BODY&field1=1").unwrap();
        assert_eq!(form, "api_key=BODY&field1=1");
    }
}
