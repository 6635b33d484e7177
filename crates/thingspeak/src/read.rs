//! ThingSpeak's REST read API: `GET /channels/<id>/feeds.json` and
//! `GET /channels/<id>/feeds/last.json`. The forwarder uses it to learn
//! whether an update in doubt was stored; the emulator serves it.
//!
//! `feeds.json` answers `{"channel": {...}, "feeds": [entry, ...]}`, and
//! `last.json` one entry. An entry carries `created_at`, `entry_id` and
//! `field1`..`field8` (`null` when unset); `status` and `latitude`,
//! `longitude`, `elevation` only when asked for (`status=true`,
//! `location=true`). Without read access ThingSpeak answers the body `-1`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::ChannelId;
use crate::time;

/// The format of the `start` and `end` parameters (UTC): `2026-01-02 03:04:05`.
pub const QUERY_TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// Most entries one `feeds.json` call returns.
pub const MAX_RESULTS: usize = 8000;

/// Entries returned when no filter (`results`, `start`/`end`, `days`,
/// `minutes`) is given.
pub const DEFAULT_RESULTS: usize = 100;

/// The body ThingSpeak answers when the caller may not read the channel (a
/// private channel without its read key) or the channel has no entry.
pub const NO_ACCESS: &str = "-1";

/// One entry as the read API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    #[serde(with = "time::serde_timestamp")]
    pub created_at: DateTime<Utc>,
    pub entry_id: u64,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field1: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field2: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field3: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field4: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field5: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field6: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field7: Option<String>,
    #[serde(default, deserialize_with = "time::serde_opt_text::deserialize")]
    pub field8: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub status: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub latitude: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub longitude: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub elevation: Option<String>,
}

crate::slots::impl_target_slots!(FeedEntry);

impl FeedEntry {
    /// An entry with no values.
    pub fn new(entry_id: u64, created_at: DateTime<Utc>) -> Self {
        Self {
            created_at,
            entry_id,
            field1: None,
            field2: None,
            field3: None,
            field4: None,
            field5: None,
            field6: None,
            field7: None,
            field8: None,
            status: None,
            latitude: None,
            longitude: None,
            elevation: None,
        }
    }
}

/// The channel object of a `feeds.json` answer (the members a client may use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedChannel {
    pub id: ChannelId,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub last_entry_id: Option<u64>,
}

/// A `feeds.json` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feeds {
    pub channel: FeedChannel,
    pub feeds: Vec<FeedEntry>,
}

/// What a read call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer<T> {
    Found(T),
    /// The body `-1`: no read access (or, for `last.json`, no entry yet).
    NoAccess,
}

/// Parses a read API body: the JSON of `T`, or `-1`.
pub fn parse_answer<T: for<'de> Deserialize<'de>>(
    body: &[u8],
) -> Result<ReadAnswer<T>, serde_json::Error> {
    if body.trim_ascii() == NO_ACCESS.as_bytes() {
        return Ok(ReadAnswer::NoAccess);
    }
    serde_json::from_slice(body).map(ReadAnswer::Found)
}

/// Formats a time for the `start` and `end` parameters.
pub fn format_query_time(t: &DateTime<Utc>) -> String {
    t.format(QUERY_TIME_FORMAT).to_string()
}

/// The path and query of a `feeds.json` call for the entries created in
/// `[start, end]`, with the read key if the channel needs one. The key is in
/// the query: never log the result.
pub fn feeds_path(
    channel: ChannelId,
    start: &DateTime<Utc>,
    end: &DateTime<Utc>,
    read_key: Option<&str>,
) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(key) = read_key {
        query.append_pair("api_key", key);
    }
    query.append_pair("start", &format_query_time(start));
    query.append_pair("end", &format_query_time(end));
    format!("/channels/{channel}/feeds.json?{}", query.finish())
}

/// The path and query of a `feeds/last.json` call.
pub fn last_path(channel: ChannelId, read_key: Option<&str>) -> String {
    match read_key {
        Some(key) => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("api_key", key);
            format!("/channels/{channel}/feeds/last.json?{}", query.finish())
        }
        None => format!("/channels/{channel}/feeds/last.json"),
    }
}

/// For log lines: a path with the key masked.
pub fn redact(path_and_query: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k == "api_key" {
            out.append_pair(&k, "****");
        } else {
            out.append_pair(&k, &v);
        }
    }
    format!("{path}?{}", out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Field, Target};
    use chrono::TimeZone;

    #[test]
    fn parses_thingspeak_documented_answer() {
        let body = br#"{"channel":{"id":9,"name":"my_house","latitude":"40.44","field1":"Light",
            "created_at":"2010-12-13T20:20:06-05:00","updated_at":"2014-02-26T12:43:04-05:00",
            "last_entry_id":6060625},
            "feeds":[{"created_at":"2014-02-26T12:42:49-05:00","entry_id":6060625,"field1":"188",
            "field2":"25.902335456475583"}]}"#;
        let ReadAnswer::Found(feeds) = parse_answer::<Feeds>(body).unwrap() else {
            panic!("found expected");
        };
        assert_eq!(feeds.channel.id, ChannelId::new(9).unwrap());
        assert_eq!(feeds.channel.last_entry_id, Some(6060625));
        let e = &feeds.feeds[0];
        assert_eq!(e.entry_id, 6060625);
        assert_eq!(
            e.created_at,
            Utc.with_ymd_and_hms(2014, 2, 26, 17, 42, 49).unwrap()
        );
        assert_eq!(e.get(Target::Field(Field::new(1).unwrap())), Some("188"));
        assert_eq!(e.get(Target::Field(Field::new(3).unwrap())), None);
        assert_eq!(
            parse_answer::<FeedEntry>(b"-1\n").unwrap(),
            ReadAnswer::NoAccess
        );
        assert!(parse_answer::<FeedEntry>(b"<html>").is_err());
    }

    #[test]
    fn entries_serialize_in_thingspeak_shape() {
        let mut e = FeedEntry::new(5, Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        e.set(Target::Field(Field::new(1).unwrap()), Some("1.5".into()));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"created_at":"2026-01-02T03:04:05Z","entry_id":5,"field1":"1.5","field2":null,"field3":null,"field4":null,"field5":null,"field6":null,"field7":null,"field8":null}"#
        );
    }

    #[test]
    fn paths_carry_the_window_and_the_key_which_redact_masks() {
        let ch = ChannelId::new(42).unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let p = feeds_path(ch, &t, &(t + chrono::TimeDelta::seconds(1)), Some("RK"));
        assert_eq!(
            p,
            "/channels/42/feeds.json?api_key=RK&start=2026-01-02+03%3A04%3A05&end=2026-01-02+03%3A04%3A06"
        );
        assert!(!redact(&p).contains("RK"), "{}", redact(&p));
        assert_eq!(last_path(ch, None), "/channels/42/feeds/last.json");
        assert_eq!(
            redact(&last_path(ch, Some("RK"))),
            "/channels/42/feeds/last.json?api_key=****"
        );
    }
}
