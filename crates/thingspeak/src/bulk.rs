//! REST request bodies: `POST /channels/<id>/bulk_update.json` (JSON) and
//! `POST /update.json` (form parameters).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::Target;
use crate::keys::{KeyError, WriteKey};
use crate::limits::{self, License, ValueTooLong};
use crate::payload::{self, ChannelUpdate, PayloadError};
use crate::time;

/// Body of `bulk_update.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkUpdateRequest {
    pub write_api_key: WriteKey,
    pub updates: Vec<BulkEntry>,
}

/// One entry of a bulk update: a time (absolute `created_at`, or `delta_t`
/// seconds relative to the previous entry) and its values.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkEntry {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde_opt_timestamp"
    )]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_t: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field1: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field2: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field3: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field4: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field5: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field6: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field7: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub field8: Option<String>,
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time::serde_opt_text::deserialize"
    )]
    pub status: Option<String>,
}

/// Why a bulk request is not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BulkError {
    #[error("bulk update has no entries")]
    NoUpdates,
    #[error("bulk update has {count} entries, at most {max} are allowed")]
    TooMany { count: usize, max: usize },
    #[error("entry {index}: needs exactly one of created_at and delta_t")]
    Time { index: usize },
    #[error("entry {index}: delta_t {delta_t} is not a finite, non-negative number of seconds")]
    BadDelta { index: usize, delta_t: f64 },
    #[error("entry {index}: no field, status or location value")]
    NoValues { index: usize },
    #[error("entry {index}: {source}")]
    ValueTooLong { index: usize, source: ValueTooLong },
}

impl BulkEntry {
    /// An entry at an absolute time with the update's values.
    pub fn from_update(update: &ChannelUpdate, created_at: DateTime<Utc>) -> Self {
        let mut entry = BulkEntry {
            created_at: Some(created_at),
            ..BulkEntry::default()
        };
        for (target, value) in &update.values {
            *entry.slot_mut(*target) = Some(value.clone());
        }
        entry
    }

    /// The entry's values by target.
    pub fn values(&self) -> BTreeMap<Target, String> {
        payload::all_targets()
            .filter_map(|t| self.get(t).map(|v| (t, v.to_owned())))
            .collect()
    }
}

crate::slots::impl_target_slots!(BulkEntry);

impl BulkUpdateRequest {
    /// Checks the request against the licence's limits and the per-entry rules.
    pub fn validate(&self, license: License) -> Result<(), BulkError> {
        if self.updates.is_empty() {
            return Err(BulkError::NoUpdates);
        }
        let max = license.bulk_max_updates();
        if self.updates.len() > max {
            return Err(BulkError::TooMany {
                count: self.updates.len(),
                max,
            });
        }
        for (index, entry) in self.updates.iter().enumerate() {
            match (entry.created_at, entry.delta_t) {
                (Some(_), None) => {}
                (None, Some(d)) if d.is_finite() && d >= 0.0 => {}
                (None, Some(d)) => return Err(BulkError::BadDelta { index, delta_t: d }),
                _ => return Err(BulkError::Time { index }),
            }
            let values = entry.values();
            if values.is_empty() {
                return Err(BulkError::NoValues { index });
            }
            for (target, value) in &values {
                limits::check_value(target.param_name(), value)
                    .map_err(|source| BulkError::ValueTooLong { index, source })?;
            }
        }
        Ok(())
    }
}

/// Parameters of `POST /update.json`: the write key plus a channel update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    pub api_key: WriteKey,
    pub update: ChannelUpdate,
}

/// Why `/update.json` parameters were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateRequestError {
    #[error("api_key is missing")]
    MissingKey,
    #[error("api_key appears more than once")]
    DuplicateKey,
    #[error("api_key: {0}")]
    BadKey(KeyError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

impl UpdateRequest {
    /// The URL-encoded form (`api_key=...&field1=...`).
    pub fn to_form(&self) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        out.append_pair("api_key", self.api_key.expose());
        let rest = self.update.encode();
        let mut form = out.finish();
        if !rest.is_empty() {
            form.push('&');
            form.push_str(&rest);
        }
        form
    }

    /// Parses a form body or query string.
    pub fn parse_form(body: &[u8]) -> Result<UpdateRequest, UpdateRequestError> {
        let mut key = None;
        let mut rest = Vec::new();
        for (name, value) in payload::parse_pairs(body)? {
            if name == "api_key" {
                if key.is_some() {
                    return Err(UpdateRequestError::DuplicateKey);
                }
                key = Some(WriteKey::new(value).map_err(UpdateRequestError::BadKey)?);
            } else {
                rest.push((name, value));
            }
        }
        let api_key = key.ok_or(UpdateRequestError::MissingKey)?;
        let update = ChannelUpdate::from_pairs(rest)?;
        Ok(UpdateRequest { api_key, update })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Field;
    use chrono::TimeZone;

    #[test]
    fn bulk_request_json_shape() {
        let body = r#"{"write_api_key":"WK","updates":[
            {"created_at":"2026-01-02T03:04:05Z","field1":"1.5","field2":7},
            {"delta_t":15,"status":"ok"}]}"#;
        let req: BulkUpdateRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.write_api_key.expose(), "WK");
        assert_eq!(
            req.updates[0].created_at,
            Some(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap())
        );
        assert_eq!(req.updates[0].field2.as_deref(), Some("7"));
        assert_eq!(req.updates[1].delta_t, Some(15.0));
        assert_eq!(req.validate(License::Free), Ok(()));
        let back = serde_json::to_value(&req).unwrap();
        assert_eq!(back["updates"][0]["created_at"], "2026-01-02T03:04:05Z");
        assert!(back["updates"][1].get("field1").is_none());
        assert!(serde_json::from_str::<BulkUpdateRequest>(
            r#"{"write_api_key":"WK","updates":[],"extra":1}"#
        )
        .is_err());
    }

    #[test]
    fn bulk_validation() {
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        let mut u = ChannelUpdate::new();
        u.set(Target::Status, "x");
        let entry = BulkEntry::from_update(&u, t);
        let req = |updates: Vec<BulkEntry>| BulkUpdateRequest {
            write_api_key: WriteKey::new("K").unwrap(),
            updates,
        };
        assert_eq!(
            req(vec![]).validate(License::Free),
            Err(BulkError::NoUpdates)
        );
        assert_eq!(
            req(vec![entry.clone(); 961]).validate(License::Free),
            Err(BulkError::TooMany {
                count: 961,
                max: 960
            })
        );
        assert_eq!(
            req(vec![entry.clone(); 961]).validate(License::Paid),
            Ok(())
        );
        let mut both = entry.clone();
        both.delta_t = Some(1.0);
        assert_eq!(
            req(vec![both]).validate(License::Free),
            Err(BulkError::Time { index: 0 })
        );
        let empty = BulkEntry {
            created_at: Some(t),
            ..BulkEntry::default()
        };
        assert_eq!(
            req(vec![entry, empty]).validate(License::Free),
            Err(BulkError::NoValues { index: 1 })
        );
    }

    #[test]
    fn update_form_round_trips() {
        let mut u = ChannelUpdate::new();
        u.set(Target::Field(Field::new(1).unwrap()), "3");
        let req = UpdateRequest {
            api_key: WriteKey::new("ABC").unwrap(),
            update: u,
        };
        assert_eq!(req.to_form(), "api_key=ABC&field1=3");
        assert_eq!(UpdateRequest::parse_form(req.to_form().as_bytes()), Ok(req));
        assert_eq!(
            UpdateRequest::parse_form(b"field1=3"),
            Err(UpdateRequestError::MissingKey)
        );
        assert_eq!(
            UpdateRequest::parse_form(b"api_key=A&api_key=B&field1=3"),
            Err(UpdateRequestError::DuplicateKey)
        );
    }
}
