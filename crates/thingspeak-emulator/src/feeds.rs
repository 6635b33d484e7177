//! ThingSpeak's REST read API: `GET /channels/<id>/feeds.json` and
//! `GET /channels/<id>/feeds/last.json`, in ThingSpeak's JSON shape
//! (`thingspeak::read`). A private channel (one with a read key) answers only
//! with `api_key=<read key>`; otherwise the body is `-1`, as ThingSpeak's is.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, TimeDelta, Utc};
use thingspeak::payload::all_targets;
use thingspeak::read::{FeedChannel, FeedEntry, Feeds, DEFAULT_RESULTS, MAX_RESULTS, NO_ACCESS};
use thingspeak::{parse_timestamp, ChannelId, Target};
use tracing::debug;

use crate::core::Core;
use crate::counters::LiveCounters;
use crate::state::Entry;

/// The query parameters understood. Others (`metadata`, `round`, ...) are
/// ignored, as ThingSpeak ignores what it does not know.
#[derive(Debug, Default, PartialEq)]
struct FeedQuery {
    api_key: Option<String>,
    results: Option<usize>,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    days: Option<f64>,
    minutes: Option<f64>,
    status: bool,
    location: bool,
}

impl FeedQuery {
    fn parse(pairs: &[(String, String)]) -> Result<Self, String> {
        let mut q = FeedQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "api_key" => q.api_key = Some(v.clone()),
                "results" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| format!("results={v:?} is not a count"))?;
                    q.results = Some(n.min(MAX_RESULTS));
                }
                "start" => q.start = Some(query_time("start", v)?),
                "end" => q.end = Some(query_time("end", v)?),
                "days" => q.days = Some(positive("days", v)?),
                "minutes" => q.minutes = Some(positive("minutes", v)?),
                "status" => q.status = v == "true",
                "location" => q.location = v == "true",
                // The emulator keeps UTC only: say so rather than answer
                // times a client would misread.
                "timezone" | "offset" => {
                    return Err(format!("{k} is not supported by the emulator (UTC only)"))
                }
                _ => {}
            }
        }
        Ok(q)
    }

    fn filtered(&self) -> bool {
        self.start.is_some() || self.end.is_some() || self.days.is_some() || self.minutes.is_some()
    }

    /// The entries this query selects, oldest first.
    fn select<'a>(&self, entries: &'a [Entry], now: DateTime<Utc>) -> Vec<&'a Entry> {
        let since = [
            self.start,
            self.days.map(|d| now - secs(d * 86_400.0)),
            self.minutes.map(|m| now - secs(m * 60.0)),
        ]
        .into_iter()
        .flatten()
        .max();
        let mut chosen: Vec<&Entry> = entries
            .iter()
            .filter(|e| since.is_none_or(|s| e.created_at() >= s))
            .filter(|e| self.end.is_none_or(|end| e.created_at() <= end))
            .collect();
        // Entries are kept in entry-id order; answers list them by time.
        chosen.sort_by_key(|e| (e.created_at(), e.entry_id()));
        let limit = match (self.results, self.filtered()) {
            (Some(n), _) => n,
            (None, true) => MAX_RESULTS,
            (None, false) => DEFAULT_RESULTS,
        };
        let skip = chosen.len().saturating_sub(limit);
        chosen.split_off(skip)
    }

    fn entry(&self, e: &Entry) -> FeedEntry {
        let mut out = FeedEntry::new(e.entry_id(), e.created_at());
        for target in all_targets() {
            let wanted = match target {
                Target::Field(_) => true,
                Target::Status => self.status,
                Target::Latitude | Target::Longitude | Target::Elevation => self.location,
            };
            if wanted {
                out.set(target, e.get(target).map(str::to_owned));
            }
        }
        out
    }
}

fn secs(s: f64) -> TimeDelta {
    TimeDelta::milliseconds((s * 1000.0) as i64)
}

fn query_time(name: &str, v: &str) -> Result<DateTime<Utc>, String> {
    parse_timestamp(v).map_err(|_| format!("{name}={v:?} is not a time like 2026-01-02 03:04:05"))
}

fn positive(name: &str, v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok(n),
        _ => Err(format!("{name}={v:?} is not a non-negative number")),
    }
}

/// `-1`, ThingSpeak's answer when the channel cannot be read.
fn no_access(status: StatusCode) -> Response {
    (status, NO_ACCESS).into_response()
}

/// Checks the channel and the key; `Err` is the status to answer `-1` with.
fn readable(core: &Core, id: &str, key: Option<&str>) -> Result<ChannelId, StatusCode> {
    let Ok(channel) = id.parse::<ChannelId>() else {
        return Err(StatusCode::NOT_FOUND);
    };
    let store = core.store();
    let Some(spec) = store.channel(channel) else {
        return Err(StatusCode::NOT_FOUND);
    };
    match &spec.read_key {
        Some(read_key) if key != Some(read_key.as_str()) => {
            LiveCounters::inc(&core.counters.feed_reads_refused);
            debug!(%channel, "feed read without the channel's read key refused");
            Err(StatusCode::BAD_REQUEST)
        }
        _ => Ok(channel),
    }
}

pub(crate) async fn feeds(
    State(core): State<Arc<Core>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    LiveCounters::inc(&core.counters.feed_reads);
    let q = match FeedQuery::parse(&pairs) {
        Ok(q) => q,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let channel = match readable(&core, &id, q.api_key.as_deref()) {
        Ok(c) => c,
        Err(status) => return no_access(status),
    };
    let store = core.store();
    let entries = store.entries(channel).unwrap_or(&[]);
    let body = Feeds {
        channel: FeedChannel {
            id: channel,
            name: format!("Channel {channel}"),
            last_entry_id: store.last_entry(channel).map(Entry::entry_id),
        },
        feeds: q
            .select(entries, Utc::now())
            .into_iter()
            .map(|e| q.entry(e))
            .collect(),
    };
    Json(body).into_response()
}

pub(crate) async fn last(
    State(core): State<Arc<Core>>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    LiveCounters::inc(&core.counters.feed_reads);
    let q = match FeedQuery::parse(&pairs) {
        Ok(q) => q,
        Err(message) => return (StatusCode::BAD_REQUEST, message).into_response(),
    };
    let channel = match readable(&core, &id, q.api_key.as_deref()) {
        Ok(c) => c,
        Err(status) => return no_access(status),
    };
    match core.store().last_entry(channel) {
        Some(e) => Json(q.entry(e)).into_response(),
        // ThingSpeak's answer for a channel without entries.
        None => no_access(StatusCode::OK),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::WriteOrigin;
    use chrono::TimeZone;
    use thingspeak::{EntryJson, Field};

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn entry(id: u64, secs: i64) -> Entry {
        let ch = ChannelId::new(1).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + TimeDelta::seconds(secs);
        let mut data = EntryJson::new(ch, id, t);
        data.set(Target::Field(Field::new(1).unwrap()), Some(id.to_string()));
        data.set(Target::Status, Some("ok".into()));
        Entry {
            data,
            origin: WriteOrigin::Mqtt,
        }
    }

    #[test]
    fn start_and_end_are_inclusive_and_results_keeps_the_newest() {
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, i as i64 * 10)).collect();
        let now = Utc::now();
        let q = FeedQuery::parse(&pairs(&[
            ("start", "2026-01-01 00:00:20"),
            ("end", "2026-01-01T00:00:40Z"),
        ]))
        .unwrap();
        let ids: Vec<u64> = q
            .select(&entries, now)
            .iter()
            .map(|e| e.entry_id())
            .collect();
        assert_eq!(ids, vec![2, 3, 4]);
        let q = FeedQuery::parse(&pairs(&[("results", "2")])).unwrap();
        let ids: Vec<u64> = q
            .select(&entries, now)
            .iter()
            .map(|e| e.entry_id())
            .collect();
        assert_eq!(ids, vec![4, 5]);
        let q = FeedQuery::parse(&[]).unwrap();
        assert_eq!(q.select(&entries, now).len(), 5, "default 100");
    }

    #[test]
    fn status_and_location_only_when_asked() {
        let e = entry(1, 0);
        let plain = FeedQuery::default().entry(&e);
        assert_eq!(plain.status, None);
        assert_eq!(plain.field1.as_deref(), Some("1"));
        let q = FeedQuery::parse(&pairs(&[("status", "true")])).unwrap();
        assert_eq!(q.entry(&e).status.as_deref(), Some("ok"));
    }

    #[test]
    fn bad_parameters_are_named() {
        let err = FeedQuery::parse(&pairs(&[("start", "yesterday")])).unwrap_err();
        assert!(err.contains("start"), "{err}");
        let err = FeedQuery::parse(&pairs(&[("results", "-1")])).unwrap_err();
        assert!(err.contains("results"), "{err}");
        let err = FeedQuery::parse(&pairs(&[("offset", "2")])).unwrap_err();
        assert!(err.contains("offset"), "{err}");
        assert_eq!(
            FeedQuery::parse(&pairs(&[("results", "9000"), ("metadata", "true")]))
                .unwrap()
                .results,
            Some(MAX_RESULTS)
        );
    }
}
