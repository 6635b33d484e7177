//! Property tests: everything this crate encodes parses back to the same
//! value, and no parser panics on arbitrary input.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use thingspeak::{
    BulkUpdateRequest, ChannelId, ChannelUpdate, EntryJson, Field, FieldFilter, ReadKey, Target,
    Topic, UpdateRequest, WriteKey,
};

fn channel() -> impl Strategy<Value = ChannelId> {
    (1u64..=u64::MAX).prop_map(|n| ChannelId::new(n).unwrap())
}

fn field() -> impl Strategy<Value = Field> {
    (1u8..=8).prop_map(|n| Field::new(n).unwrap())
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        field().prop_map(Target::Field),
        Just(Target::Status),
        Just(Target::Latitude),
        Just(Target::Longitude),
        Just(Target::Elevation),
    ]
}

fn key_text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{1,64}"
}

fn write_key() -> impl Strategy<Value = Option<WriteKey>> {
    proptest::option::of(key_text().prop_map(|k| WriteKey::new(k).unwrap()))
}

fn read_key() -> impl Strategy<Value = Option<ReadKey>> {
    proptest::option::of(key_text().prop_map(|k| ReadKey::new(k).unwrap()))
}

fn topic() -> impl Strategy<Value = Topic> {
    prop_oneof![
        (channel(), write_key()).prop_map(|(channel, key)| Topic::Publish { channel, key }),
        (channel(), field(), write_key()).prop_map(|(channel, field, key)| Topic::PublishField {
            channel,
            field,
            key
        }),
        channel().prop_map(|channel| Topic::Subscribe { channel }),
        (channel(), read_key()).prop_map(|(channel, key)| Topic::SubscribeJson { channel, key }),
        (
            channel(),
            prop_oneof![field().prop_map(FieldFilter::One), Just(FieldFilter::All)],
            read_key()
        )
            .prop_map(|(channel, fields, key)| Topic::SubscribeFields {
                channel,
                fields,
                key
            }),
    ]
}

/// Whole-second timestamps between 1970 and 2200 (the wire format has seconds resolution).
fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    (0i64..7_258_118_400).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap())
}

/// Values of up to 255 bytes: any characters, including `&`, `=`, `+`, `%` and non-ASCII.
fn value() -> impl Strategy<Value = String> {
    ".{0,60}".prop_filter("at most 255 bytes", |s| s.len() <= 255)
}

fn update() -> impl Strategy<Value = ChannelUpdate> {
    (
        proptest::collection::btree_map(target(), value(), 1..=12),
        proptest::option::of(timestamp()),
    )
        .prop_map(|(values, created_at)| ChannelUpdate { values, created_at })
        .prop_filter("fits in one message", |u| u.validate().is_ok())
}

proptest! {
    #[test]
    fn topics_round_trip(t in topic()) {
        prop_assert_eq!(Topic::parse(&t.to_string()).unwrap(), t);
    }

    #[test]
    fn updates_round_trip(u in update()) {
        prop_assert_eq!(ChannelUpdate::parse(u.encode().as_bytes()).unwrap(), u);
    }

    #[test]
    fn update_forms_round_trip(u in update(), k in key_text()) {
        let req = UpdateRequest { api_key: WriteKey::new(k).unwrap(), update: u };
        prop_assert_eq!(UpdateRequest::parse_form(req.to_form().as_bytes()).unwrap(), req);
    }

    #[test]
    fn entry_json_round_trips(ch in channel(), id in any::<u64>(), t in timestamp(), u in update()) {
        let e = EntryJson::from_update(ch, id, t, &u);
        let json = serde_json::to_string(&e).unwrap();
        let back: EntryJson = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(back.to_update().values, u.values);
    }

    #[test]
    fn topic_parser_never_panics(s in ".{0,200}") {
        let _ = Topic::parse(&s);
    }

    #[test]
    fn topic_parser_never_panics_on_topic_like_text(
        s in "(channels|[a-z+#]{0,3})(/[a-z0-9+#]{0,12}){0,7}"
    ) {
        let _ = Topic::parse(&s);
    }

    #[test]
    fn payload_parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..4000)) {
        let _ = ChannelUpdate::parse(&b);
        let _ = UpdateRequest::parse_form(&b);
        let _ = thingspeak::parse_field_value(Field::new(1).unwrap(), &b);
        let _ = serde_json::from_slice::<EntryJson>(&b);
        let _ = serde_json::from_slice::<BulkUpdateRequest>(&b);
    }

    #[test]
    fn payload_parser_never_panics_on_form_like_text(
        s in "([a-z_0-9]{0,10}(=[a-zA-Z0-9%+:TZ.-]{0,20})?&?){0,14}"
    ) {
        let _ = ChannelUpdate::parse(s.as_bytes());
    }
}
