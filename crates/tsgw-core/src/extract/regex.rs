//! Free-form lines matched by a regular expression with named groups:
//! `T:(?P<temp>[-\d.]+)C H:(?P<hum>\d+)%` maps group `temp` and `hum` to fields.

use regex::{Regex as Pattern, RegexBuilder};

use super::{parse_timestamp, Destination, ExtractError, Extracted, Extraction, FormatError};
use crate::reading::Value;

/// Compiled programs above this size are refused: a config typo such as `\w{1000}{1000}`
/// should fail at start-up, not eat memory.
const SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Regex {
    pattern: Pattern,
    groups: Vec<(String, Destination)>,
    time_group: Option<String>,
}

impl Regex {
    pub(super) fn new(
        pattern: &str,
        groups: Vec<(String, Destination)>,
        time_group: Option<String>,
    ) -> Result<Self, FormatError> {
        let compiled = RegexBuilder::new(pattern)
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(|e| FormatError::Invalid(format!("regex {pattern:?} is invalid: {e}")))?;
        let known = |name: &str| compiled.capture_names().flatten().any(|n| n == name);
        for name in groups
            .iter()
            .map(|(name, _)| name.as_str())
            .chain(time_group.as_deref())
        {
            if !known(name) {
                return Err(FormatError::Invalid(format!(
                    "regex {pattern:?} has no named group {name:?} (write it as (?P<{name}>...))"
                )));
            }
        }
        Ok(Self {
            pattern: compiled,
            groups,
            time_group,
        })
    }

    pub(super) fn extract(&self, text: &str) -> Extraction {
        let mut out = Extraction::default();
        let Some(captures) = self.pattern.captures(text) else {
            out.errors.push(ExtractError::NoMatch);
            return out;
        };
        let measured_at = self
            .time_group
            .as_deref()
            .and_then(|group| match captures.name(group) {
                Some(m) => match parse_timestamp(m.as_str()) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        out.errors.push(e);
                        None
                    }
                },
                None => {
                    out.errors.push(ExtractError::MissingGroup {
                        group: group.to_owned(),
                    });
                    None
                }
            });
        for (group, destination) in &self.groups {
            // An optional group that did not take part in the match is a missing value.
            let Some(m) = captures.name(group) else {
                out.errors.push(ExtractError::MissingGroup {
                    group: group.clone(),
                });
                continue;
            };
            match destination.apply(Value::from_text(m.as_str())) {
                Ok(value) => out.values.push(Extracted {
                    channel: destination.channel,
                    target: destination.target,
                    value,
                    measured_at,
                }),
                Err(e) => out.errors.push(e),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingspeak::{ChannelId, Target};

    fn regex(pattern: &str, groups: &[(&str, &str)]) -> Result<Regex, FormatError> {
        let groups = crate::extract::test_mapping(groups, 10.0);
        Regex::new(pattern, groups, None)
    }

    #[test]
    fn named_groups_feed_their_fields() {
        let r = regex(
            r"T:(?P<temp>-?[\d.]+)C H:(?<hum>\d+)%",
            &[("temp", "field1"), ("hum", "field2")],
        )
        .unwrap();
        let out = r.extract("T:-2.5C H:41% batt ok");
        assert_eq!(out.errors, vec![]);
        assert_eq!(out.values[0].value, Value::Number(-25.0));
        assert_eq!(out.values[1].value, Value::Number(410.0));
    }

    #[test]
    fn a_line_that_does_not_match_is_one_error() {
        let r = regex(r"T:(?P<temp>\d+)", &[("temp", "field1")]).unwrap();
        let out = r.extract("hello");
        assert_eq!(out.errors, vec![ExtractError::NoMatch]);
        assert!(out.values.is_empty());
    }

    #[test]
    fn optional_groups_that_did_not_match_are_reported_and_others_kept() {
        let r = regex(
            r"a=(?P<a>\d+)(?: b=(?P<b>\d+))?",
            &[("a", "field1"), ("b", "field2")],
        )
        .unwrap();
        let out = r.extract("a=1");
        assert_eq!(out.values.len(), 1);
        assert_eq!(
            out.errors,
            vec![ExtractError::MissingGroup { group: "b".into() }]
        );
    }

    #[test]
    fn config_errors_name_the_pattern_and_group() {
        match regex(r"(?P<t>\d+", &[("t", "field1")]) {
            Err(FormatError::Invalid(m)) => assert!(m.contains(r"(?P<t>\d+"), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        match regex(r"(?P<t>\d+)", &[("temp", "field1")]) {
            Err(FormatError::Invalid(m)) => assert!(m.contains("\"temp\""), "{m}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(regex(r"\w{1000}{1000}", &[]).is_err());
    }

    #[test]
    fn time_group_sets_measured_at() {
        let groups = vec![(
            "v".to_string(),
            Destination {
                channel: ChannelId::new(1).unwrap(),
                target: Target::Status,
                scale: 1.0,
                offset: 0.0,
            },
        )];
        let r = Regex::new(r"(?P<ts>\d+) (?P<v>\w+)", groups, Some("ts".into())).unwrap();
        let out = r.extract("1767323045 open");
        assert_eq!(
            out.values[0].measured_at.unwrap().timestamp(),
            1_767_323_045
        );
        assert!(Regex::new(r"(?P<v>\w+)", vec![], Some("ts".into())).is_err());
    }
}
