//! `GET /tail`: readings as they enter the queue, one JSON object a line
//! (NDJSON), for `tsgw tail`. Optional filters: `?channel=1001&device=esp`.
//!
//! A follower that reads slower than the gateway stores gets a
//! `{"lagged_batches":N}` line where it missed batches; it never slows the
//! writer. An empty line every [`KEEPALIVE`] lets both ends notice a dead
//! connection. The stream ends when the gateway stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tsgw_core::Reading;

use super::recent::TailBatch;
use super::StatusService;

/// An empty line this often while nothing arrives.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Followers at once; more are refused (503) rather than each costing a
/// task and a feed receiver without bound.
pub const MAX_FOLLOWERS: usize = 16;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub channel: Option<u64>,
    pub device: Option<String>,
}

impl Filter {
    fn admits(&self, r: &Reading) -> bool {
        self.channel.is_none_or(|c| r.channel.get() == c)
            && self.device.as_deref().is_none_or(|d| r.origin.device == d)
    }
}

/// One line of the feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TailLine {
    pub measured_at: chrono::DateTime<chrono::Utc>,
    pub source: String,
    pub device: String,
    pub channel: u64,
    pub target: String,
    pub value: tsgw_core::Value,
}

impl From<&Reading> for TailLine {
    fn from(r: &Reading) -> Self {
        TailLine {
            measured_at: r.measured_at,
            source: r.origin.source.to_string(),
            device: r.origin.device.clone(),
            channel: r.channel.get(),
            target: r.target.to_string(),
            value: r.value.clone(),
        }
    }
}

/// The lines of one stored batch that pass the filter.
pub fn lines(batch: &TailBatch, filter: &Filter) -> String {
    let mut out = String::new();
    for reading in batch.iter().filter(|r| filter.admits(r)) {
        if let Ok(json) = serde_json::to_string(&TailLine::from(reading)) {
            out.push_str(&json);
            out.push('\n');
        }
    }
    out
}

/// One follower's state, moved through the stream.
struct Follower {
    feed: broadcast::Receiver<TailBatch>,
    stop: CancellationToken,
    filter: Filter,
    /// Held while the follower is connected.
    _slot: OwnedSemaphorePermit,
}

pub async fn handler(
    State(service): State<StatusService>,
    Query(filter): Query<Filter>,
) -> Response {
    let Ok(slot) = service.followers.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_FOLLOWERS} followers already; try again later\n"),
        )
            .into_response();
    };
    // Subscribed before the response goes out: a client that saw the
    // headers misses nothing stored after.
    let follower = Follower {
        feed: service.recent.subscribe(),
        stop: service.shutdown.clone(),
        filter,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(follower, |mut f| async move {
        loop {
            let next = tokio::select! {
                () = f.stop.cancelled() => return None,
                next = f.feed.recv() => next,
                () = tokio::time::sleep(KEEPALIVE) => {
                    return Some((Ok::<_, Infallible>(Bytes::from_static(b"\n")), f));
                }
            };
            let chunk = match next {
                Ok(batch) => lines(&batch, &f.filter),
                Err(RecvError::Lagged(missed)) => format!("{{\"lagged_batches\":{missed}}}\n"),
                Err(RecvError::Closed) => return None,
            };
            if !chunk.is_empty() {
                return Some((Ok(Bytes::from(chunk)), f));
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tsgw_core::{ChannelId, Field, Origin, SourceKind, Target, Value};

    fn reading(channel: u64, device: &str) -> Reading {
        Reading {
            channel: ChannelId::new(channel).unwrap(),
            target: Target::Field(Field::new(1).unwrap()),
            value: Value::Number(21.5),
            measured_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            origin: Origin::new(SourceKind::Mqtt, device),
        }
    }

    #[test]
    fn lines_are_json_and_filtered() {
        let batch: TailBatch = Arc::new(vec![reading(1, "a"), reading(2, "b")]);
        let all = lines(&batch, &Filter::default());
        assert_eq!(all.lines().count(), 2);
        let first: TailLine = serde_json::from_str(all.lines().next().unwrap()).unwrap();
        assert_eq!(
            first,
            TailLine {
                measured_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
                source: "mqtt".into(),
                device: "a".into(),
                channel: 1,
                target: "field1".into(),
                value: Value::Number(21.5),
            }
        );
        let only_b = lines(
            &batch,
            &Filter {
                channel: Some(2),
                device: Some("b".into()),
            },
        );
        assert_eq!(only_b.lines().count(), 1);
        assert!(lines(
            &batch,
            &Filter {
                channel: Some(3),
                device: None
            }
        )
        .is_empty());
    }
}
