//! ThingSpeak's MQTT topics, current and legacy, parsed into a typed [`Topic`]
//! and built back with `Display`.
//!
//! | form | topic |
//! |---|---|
//! | [`Topic::Publish`] | `channels/<id>/publish` (legacy: `.../publish/<writeKey>`) |
//! | [`Topic::PublishField`] | `channels/<id>/publish/fields/field<n>` (legacy: `.../field<n>/<writeKey>`) |
//! | [`Topic::Subscribe`] | `channels/<id>/subscribe` |
//! | [`Topic::SubscribeJson`] | legacy `channels/<id>/subscribe/json` and `.../json/<readKey>` |
//! | [`Topic::SubscribeFields`] | `channels/<id>/subscribe/fields/field<n>` or `.../fields/+` (legacy: `.../<readKey>`) |

use std::fmt;
use std::str::FromStr;

use crate::ids::{ChannelId, Field, FIELD_COUNT};
use crate::keys::{KeyError, ReadKey, WriteKey};

/// Which fields a field subscription selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldFilter {
    One(Field),
    /// `fields/+`: every field of the channel.
    All,
}

impl FieldFilter {
    pub fn matches(self, field: Field) -> bool {
        match self {
            FieldFilter::One(f) => f == field,
            FieldFilter::All => true,
        }
    }
}

impl fmt::Display for FieldFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldFilter::One(field) => write!(f, "{field}"),
            FieldFilter::All => f.write_str("+"),
        }
    }
}

/// One ThingSpeak topic. `Debug` masks keys; `Display` builds the exact topic
/// (keys included, so do not log it when it holds one: use [`Topic::redacted`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Publish {
        channel: ChannelId,
        key: Option<WriteKey>,
    },
    PublishField {
        channel: ChannelId,
        field: Field,
        key: Option<WriteKey>,
    },
    Subscribe {
        channel: ChannelId,
    },
    SubscribeJson {
        channel: ChannelId,
        key: Option<ReadKey>,
    },
    SubscribeFields {
        channel: ChannelId,
        fields: FieldFilter,
        key: Option<ReadKey>,
    },
}

/// What is wrong with a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicProblem {
    #[error("the topic is empty")]
    Empty,
    #[error("segment {index} is empty")]
    EmptySegment { index: usize },
    #[error("it must start with \"channels/\"")]
    NotChannels,
    #[error("channel id {0:?} is not a positive integer")]
    BadChannel(String),
    #[error("expected \"publish\" or \"subscribe\" after the channel id, found {0:?}")]
    BadAction(String),
    #[error("expected \"fields\" or \"json\" after \"subscribe\", found {0:?}")]
    BadSubscribeKind(String),
    #[error("field {0} is out of range 1..{FIELD_COUNT}")]
    FieldOutOfRange(u64),
    #[error("{0:?} is not a field (expected field1..field{FIELD_COUNT})")]
    BadField(String),
    #[error("the wildcard \"+\" is allowed only for subscribing to fields")]
    WildcardNotAllowed,
    #[error("the wildcard \"#\" is not supported by ThingSpeak")]
    MultiLevelWildcard,
    #[error("API key segment: {0}")]
    BadKey(KeyError),
    #[error("unexpected segment(s) after {0:?}")]
    TrailingSegments(String),
    #[error("missing segment after {0:?}")]
    Missing(String),
}

/// A topic that could not be parsed. The topic text in the message has any
/// API key replaced by `****`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem} in topic {topic:?}")]
pub struct TopicError {
    pub topic: String,
    pub problem: TopicProblem,
}

impl Topic {
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        parse_segments(s).map_err(|problem| TopicError {
            topic: redact(s),
            problem,
        })
    }

    pub fn channel(&self) -> ChannelId {
        match self {
            Topic::Publish { channel, .. }
            | Topic::PublishField { channel, .. }
            | Topic::Subscribe { channel }
            | Topic::SubscribeJson { channel, .. }
            | Topic::SubscribeFields { channel, .. } => *channel,
        }
    }

    pub fn is_publish(&self) -> bool {
        matches!(self, Topic::Publish { .. } | Topic::PublishField { .. })
    }

    /// True for the legacy forms that carry an API key in the topic.
    pub fn has_key(&self) -> bool {
        match self {
            Topic::Publish { key, .. } | Topic::PublishField { key, .. } => key.is_some(),
            Topic::SubscribeJson { key, .. } | Topic::SubscribeFields { key, .. } => key.is_some(),
            Topic::Subscribe { .. } => false,
        }
    }

    /// The same topic with any API key removed (the current, keyless form;
    /// a legacy `subscribe/json` stays `subscribe/json`). The local broker
    /// relays drop-in publishes under this name, so no local subscriber ever
    /// sees a device's write key.
    pub fn without_key(&self) -> Topic {
        let mut topic = self.clone();
        match &mut topic {
            Topic::Publish { key, .. } | Topic::PublishField { key, .. } => *key = None,
            Topic::SubscribeJson { key, .. } | Topic::SubscribeFields { key, .. } => *key = None,
            Topic::Subscribe { .. } => {}
        }
        topic
    }

    /// The topic text with any key replaced by `****`, safe to log.
    pub fn redacted(&self) -> String {
        redact(&self.to_string())
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Publish { channel, key } => {
                write!(f, "channels/{channel}/publish")?;
                if let Some(k) = key {
                    write!(f, "/{k}")?;
                }
                Ok(())
            }
            Topic::PublishField {
                channel,
                field,
                key,
            } => {
                write!(f, "channels/{channel}/publish/fields/{field}")?;
                if let Some(k) = key {
                    write!(f, "/{k}")?;
                }
                Ok(())
            }
            Topic::Subscribe { channel } => write!(f, "channels/{channel}/subscribe"),
            Topic::SubscribeJson { channel, key } => {
                write!(f, "channels/{channel}/subscribe/json")?;
                if let Some(k) = key {
                    write!(f, "/{k}")?;
                }
                Ok(())
            }
            Topic::SubscribeFields {
                channel,
                fields,
                key,
            } => {
                write!(f, "channels/{channel}/subscribe/fields/{fields}")?;
                if let Some(k) = key {
                    write!(f, "/{k}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Topic, TopicError> {
        Topic::parse(s)
    }
}

fn parse_segments(s: &str) -> Result<Topic, TopicProblem> {
    if s.is_empty() {
        return Err(TopicProblem::Empty);
    }
    let segs: Vec<&str> = s.split('/').collect();
    for (index, seg) in segs.iter().enumerate() {
        if seg.is_empty() {
            return Err(TopicProblem::EmptySegment { index });
        }
        if seg.contains('#') {
            return Err(TopicProblem::MultiLevelWildcard);
        }
    }
    if segs.first() != Some(&"channels") {
        return Err(TopicProblem::NotChannels);
    }
    let channel_seg = segs
        .get(1)
        .ok_or_else(|| TopicProblem::Missing("channels".into()))?;
    if channel_seg.contains('+') {
        return Err(TopicProblem::WildcardNotAllowed);
    }
    let channel = channel_seg
        .parse::<ChannelId>()
        .map_err(|_| TopicProblem::BadChannel((*channel_seg).to_owned()))?;
    let action = segs
        .get(2)
        .ok_or_else(|| TopicProblem::Missing(format!("channels/{channel}")))?;
    let rest = &segs[3..];
    match *action {
        "publish" => parse_publish(channel, rest),
        "subscribe" => parse_subscribe(channel, rest),
        other if other.contains('+') => Err(TopicProblem::WildcardNotAllowed),
        other => Err(TopicProblem::BadAction(other.to_owned())),
    }
}

fn parse_publish(channel: ChannelId, rest: &[&str]) -> Result<Topic, TopicProblem> {
    match rest {
        [] => Ok(Topic::Publish { channel, key: None }),
        ["fields", tail @ ..] => {
            let (field_seg, key_seg) = match tail {
                [] => return Err(TopicProblem::Missing("publish/fields".into())),
                [f] => (*f, None),
                [f, k] => (*f, Some(*k)),
                [f, _, ..] => return Err(TopicProblem::TrailingSegments(format!("{f}/<key>"))),
            };
            if field_seg.contains('+') {
                return Err(TopicProblem::WildcardNotAllowed);
            }
            let field = parse_field(field_seg)?;
            let key = key_seg.map(write_key).transpose()?;
            Ok(Topic::PublishField {
                channel,
                field,
                key,
            })
        }
        [key] => Ok(Topic::Publish {
            channel,
            key: Some(write_key(key)?),
        }),
        [_, ..] => Err(TopicProblem::TrailingSegments("publish/<key>".into())),
    }
}

fn parse_subscribe(channel: ChannelId, rest: &[&str]) -> Result<Topic, TopicProblem> {
    match rest {
        [] => Ok(Topic::Subscribe { channel }),
        ["json"] => Ok(Topic::SubscribeJson { channel, key: None }),
        ["json", key] => Ok(Topic::SubscribeJson {
            channel,
            key: Some(read_key(key)?),
        }),
        ["json", _, ..] => Err(TopicProblem::TrailingSegments("json/<key>".into())),
        ["fields", tail @ ..] => {
            let (field_seg, key_seg) = match tail {
                [] => return Err(TopicProblem::Missing("subscribe/fields".into())),
                [f] => (*f, None),
                [f, k] => (*f, Some(*k)),
                [f, _, ..] => return Err(TopicProblem::TrailingSegments(format!("{f}/<key>"))),
            };
            let fields = if field_seg == "+" {
                FieldFilter::All
            } else if field_seg.contains('+') {
                return Err(TopicProblem::WildcardNotAllowed);
            } else {
                FieldFilter::One(parse_field(field_seg)?)
            };
            let key = key_seg.map(read_key).transpose()?;
            Ok(Topic::SubscribeFields {
                channel,
                fields,
                key,
            })
        }
        [other, ..] if other.contains('+') => Err(TopicProblem::WildcardNotAllowed),
        [other, ..] => Err(TopicProblem::BadSubscribeKind((*other).to_owned())),
    }
}

/// Parses `field<n>`, telling "a number out of range" apart from "not a field".
fn parse_field(seg: &str) -> Result<Field, TopicProblem> {
    let digits = seg
        .strip_prefix("field")
        .ok_or_else(|| TopicProblem::BadField(seg.to_owned()))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TopicProblem::BadField(seg.to_owned()));
    }
    // Leading zeros ("field01") would not round-trip: reject them as not a field.
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(TopicProblem::BadField(seg.to_owned()));
    }
    let n: u64 = digits.parse().unwrap_or(u64::MAX);
    u8::try_from(n)
        .ok()
        .and_then(|n| Field::new(n).ok())
        .ok_or(TopicProblem::FieldOutOfRange(n))
}

fn write_key(seg: &str) -> Result<WriteKey, TopicProblem> {
    if seg.contains('+') {
        return Err(TopicProblem::WildcardNotAllowed);
    }
    WriteKey::new(seg).map_err(TopicProblem::BadKey)
}

fn read_key(seg: &str) -> Result<ReadKey, TopicProblem> {
    if seg.contains('+') {
        return Err(TopicProblem::WildcardNotAllowed);
    }
    ReadKey::new(seg).map_err(TopicProblem::BadKey)
}

/// Replaces every segment in a key position with `****`, so topics (valid or
/// not) can be put into errors and logs.
fn redact(topic: &str) -> String {
    let mut segs: Vec<&str> = topic.split('/').collect();
    let key_from = match (segs.get(2).copied(), segs.get(3).copied()) {
        (Some("publish"), Some("fields")) | (Some("subscribe"), Some("fields")) => 5,
        (Some("publish"), Some(_)) => 3,
        (Some("subscribe"), Some("json")) => 4,
        _ => segs.len(),
    };
    for seg in segs.iter_mut().skip(key_from) {
        *seg = "****";
    }
    segs.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    #[test]
    fn parses_every_form() {
        let wk = WriteKey::new("WKEY0123456789AB").unwrap();
        let rk = ReadKey::new("RKEY").unwrap();
        let f3 = Field::new(3).unwrap();
        let cases = [
            (
                "channels/42/publish",
                Topic::Publish {
                    channel: ch(42),
                    key: None,
                },
            ),
            (
                "channels/42/publish/WKEY0123456789AB",
                Topic::Publish {
                    channel: ch(42),
                    key: Some(wk.clone()),
                },
            ),
            (
                "channels/42/publish/fields/field3",
                Topic::PublishField {
                    channel: ch(42),
                    field: f3,
                    key: None,
                },
            ),
            (
                "channels/42/publish/fields/field3/WKEY0123456789AB",
                Topic::PublishField {
                    channel: ch(42),
                    field: f3,
                    key: Some(wk),
                },
            ),
            (
                "channels/42/subscribe",
                Topic::Subscribe { channel: ch(42) },
            ),
            (
                "channels/42/subscribe/fields/field3",
                Topic::SubscribeFields {
                    channel: ch(42),
                    fields: FieldFilter::One(f3),
                    key: None,
                },
            ),
            (
                "channels/42/subscribe/fields/+",
                Topic::SubscribeFields {
                    channel: ch(42),
                    fields: FieldFilter::All,
                    key: None,
                },
            ),
            (
                "channels/42/subscribe/json",
                Topic::SubscribeJson {
                    channel: ch(42),
                    key: None,
                },
            ),
            (
                "channels/42/subscribe/json/RKEY",
                Topic::SubscribeJson {
                    channel: ch(42),
                    key: Some(rk.clone()),
                },
            ),
            (
                "channels/42/subscribe/fields/field3/RKEY",
                Topic::SubscribeFields {
                    channel: ch(42),
                    fields: FieldFilter::One(f3),
                    key: Some(rk),
                },
            ),
        ];
        for (text, topic) in cases {
            assert_eq!(Topic::parse(text).unwrap(), topic, "{text}");
            assert_eq!(topic.to_string(), text);
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Topic::parse("channels/42/publish/fields/field9").unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 9 is out of range 1..8 in topic \"channels/42/publish/fields/field9\""
        );
        let e = Topic::parse("channels/0/publish").unwrap_err();
        assert_eq!(e.problem, TopicProblem::BadChannel("0".into()));
        let e = Topic::parse("channel/1/publish").unwrap_err();
        assert_eq!(e.problem, TopicProblem::NotChannels);
        let e = Topic::parse("channels/1/publish/").unwrap_err();
        assert_eq!(e.problem, TopicProblem::EmptySegment { index: 3 });
        let e = Topic::parse("channels/1/publish/fields/+").unwrap_err();
        assert_eq!(e.problem, TopicProblem::WildcardNotAllowed);
        let e = Topic::parse("channels/1/subscribe/#").unwrap_err();
        assert_eq!(e.problem, TopicProblem::MultiLevelWildcard);
        let e = Topic::parse("channels/1/write").unwrap_err();
        assert_eq!(e.problem, TopicProblem::BadAction("write".into()));
        let e = Topic::parse("channels/1/publish/fields/fieldx").unwrap_err();
        assert_eq!(e.problem, TopicProblem::BadField("fieldx".into()));
        let e = Topic::parse("channels/1/publish/fields/field0").unwrap_err();
        assert_eq!(e.problem, TopicProblem::FieldOutOfRange(0));
        let e = Topic::parse("channels/1/publish/KEY/more").unwrap_err();
        assert!(matches!(e.problem, TopicProblem::TrailingSegments(_)));
    }

    #[test]
    fn errors_and_redacted_topics_hide_keys() {
        let e = Topic::parse("channels/1/publish/SECRETKEY/extra").unwrap_err();
        assert!(!e.to_string().contains("SECRETKEY"), "{e}");
        let e = Topic::parse("channels/1/publish/fields/field1/SECRET-KEY").unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let t = Topic::parse("channels/1/subscribe/json/SECRETKEY").unwrap();
        assert_eq!(t.redacted(), "channels/1/subscribe/json/****");
        assert!(!format!("{t:?}").contains("SECRETKEY"));
    }

    #[test]
    fn without_key_drops_only_the_key() {
        for (legacy, keyless) in [
            ("channels/7/publish/ABCDEFGHIJKLMNOP", "channels/7/publish"),
            (
                "channels/7/publish/fields/field2/ABCDEFGHIJKLMNOP",
                "channels/7/publish/fields/field2",
            ),
            ("channels/7/publish", "channels/7/publish"),
            ("channels/7/subscribe", "channels/7/subscribe"),
        ] {
            let topic = Topic::parse(legacy).unwrap();
            assert_eq!(topic.without_key().to_string(), keyless);
            assert!(!topic.without_key().has_key());
        }
    }
}
