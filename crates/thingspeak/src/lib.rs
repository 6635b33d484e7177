//! ThingSpeak's wire formats: typed ids, topics, payloads, REST bodies and limits.
//!
//! This crate does no I/O. The gateway's forwarder and the emulator both use it,
//! so the two agree on every byte by construction.
//!
//! # Public API at a glance
//! - [`ids`]: [`ChannelId`], [`Field`] (1..8), [`Target`] (field1..8, status, lat, long, elevation).
//! - [`keys`]: [`WriteKey`], [`ReadKey`] (`new`, `expose`; `Debug` masks, `Display`/serde give the key).
//! - [`topic`]: [`Topic`] (`Publish`, `PublishField`, `Subscribe`, `SubscribeJson`,
//!   `SubscribeFields` with [`FieldFilter`]), `Topic::parse(&str) -> Result<Topic, TopicError>`,
//!   `Display` builds it, `redacted()` for logs.
//! - [`payload`]: [`ChannelUpdate`] (`values: BTreeMap<Target, String>`, `created_at`;
//!   `encode()`, `parse(&[u8])`, `validate()`), [`parse_field_value`], [`EntryJson`]
//!   (subscriber JSON; `from_update`, `to_update`, `get`/`set`), [`PayloadError`].
//! - [`time`]: [`format_timestamp`] (`2026-01-02T03:04:05Z`), [`parse_timestamp`].
//! - [`limits`]: constants (`MAX_VALUE_BYTES`, `MAX_MESSAGE_BYTES`, ...), [`License`]
//!   (update interval, bulk size), `check_connect(level, clean, will)`,
//!   `check_publish(qos, retain, len)`, `check_value(name, value)`.
//! - [`bulk`]: [`BulkUpdateRequest`] / [`BulkEntry`] (serde, `validate(License)`),
//!   [`UpdateRequest`] (`/update.json` form: `to_form`, `parse_form`).

pub mod bulk;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod payload;
pub mod read;
mod slots;
pub mod time;
pub mod topic;

pub use bulk::{BulkEntry, BulkError, BulkUpdateRequest, UpdateRequest, UpdateRequestError};
pub use ids::{ChannelId, Field, IdError, Target, FIELD_COUNT};
pub use keys::{KeyError, ReadKey, WriteKey};
pub use limits::{ConnectViolation, License, PublishViolation, ValueTooLong};
pub use payload::{parse_field_value, ChannelUpdate, EntryJson, PayloadError};
pub use read::{FeedEntry, Feeds, ReadAnswer};
pub use time::{format_timestamp, parse_timestamp, BadTimestamp};
pub use topic::{FieldFilter, Topic, TopicError, TopicProblem};
