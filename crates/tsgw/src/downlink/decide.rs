//! What a rule does with one entry: the safety checks, in order, and the
//! command they let through. Pure (the caller passes the clock and the
//! rule's memory), so every refusal is unit-tested.

use std::time::Duration;

use chrono::{DateTime, Utc};
use thingspeak::EntryJson;
use tsgw_modbus::{encode_value, DataType, WordOrder, WriteValue};

use super::config::{Action, DownlinkRule, WriteKind};

/// The action to take, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Modbus {
        device: String,
        value: WriteValue,
    },
    Serial {
        port: String,
        bytes: Vec<u8>,
        within: Duration,
    },
    Mqtt {
        topic: String,
        payload: Vec<u8>,
    },
}

/// What a rule makes of an entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not for this rule: the entry does not set its source, or it was
    /// handled already (before a restart, or a repeat).
    Ignore,
    Refuse {
        reason: &'static str,
        message: String,
    },
    Apply(Command),
}

fn refuse(reason: &'static str, message: String) -> Verdict {
    Verdict::Refuse { reason, message }
}

/// A rule's view of `entry`. `last_handled` is the newest entry id the rule
/// handled (kept on disk); `since_last_action` the time since the last action
/// on the rule's target, if any.
pub fn decide(
    rule: &DownlinkRule,
    entry: &EntryJson,
    last_handled: Option<u64>,
    since_last_action: Option<Duration>,
    now: DateTime<Utc>,
) -> Verdict {
    if last_handled.is_some_and(|last| entry.entry_id <= last) {
        return Verdict::Ignore;
    }
    let Some(text) = entry.get(rule.source) else {
        return Verdict::Ignore;
    };
    let age = now.signed_duration_since(entry.created_at);
    if age.num_seconds() > rule.max_age_secs as i64 {
        return refuse(
            "too_old",
            format!(
                "entry written at {} is {} s old, over max_age_secs = {}",
                thingspeak::format_timestamp(&entry.created_at),
                age.num_seconds(),
                rule.max_age_secs
            ),
        );
    }
    let number = text.trim().parse::<f64>().ok().filter(|n| n.is_finite());
    let needs_number = rule.min.is_some()
        || rule.max.is_some()
        || matches!(&rule.action, Action::Modbus(m) if m.kind == WriteKind::Holding);
    if needs_number && number.is_none() {
        return refuse("not_a_number", format!("value {text:?} is not a number"));
    }
    if let Some(n) = number {
        if let Some(min) = rule.min.filter(|min| n < *min) {
            return refuse("below_min", format!("value {n} is below min = {min}"));
        }
        if let Some(max) = rule.max.filter(|max| n > *max) {
            return refuse("above_max", format!("value {n} is above max = {max}"));
        }
    }
    let command = match &rule.action {
        Action::Modbus(m) => {
            let value = match m.kind {
                WriteKind::Holding => {
                    let data_type = m.data_type.unwrap_or(DataType::U16);
                    let words = match encode_value(
                        number.unwrap_or_default(),
                        data_type,
                        m.order.unwrap_or(WordOrder::ABCD),
                        m.scale.unwrap_or(1.0),
                        m.offset.unwrap_or(0.0),
                    ) {
                        Ok(words) => words,
                        Err(e) => return refuse("not_representable", e.to_string()),
                    };
                    WriteValue::Registers {
                        address: m.address,
                        words,
                    }
                }
                WriteKind::Coil => match parse_bool(text) {
                    Some(value) => WriteValue::Coil {
                        address: m.address,
                        value,
                    },
                    None => {
                        return refuse(
                            "not_boolean",
                            format!("value {text:?} is not on/off (1, 0, true, false, on, off)"),
                        )
                    }
                },
            };
            Command::Modbus {
                device: m.device.clone(),
                value,
            }
        }
        Action::Serial(s) => Command::Serial {
            port: s.port.clone(),
            bytes: fill(&s.template, rule, entry, text).into_bytes(),
            within: Duration::from_millis(s.timeout_ms),
        },
        Action::Mqtt(m) => Command::Mqtt {
            topic: m.topic.clone(),
            payload: fill(&m.template, rule, entry, text).into_bytes(),
        },
    };
    let min_interval = Duration::from_millis(rule.min_interval_ms);
    if let Some(since) = since_last_action.filter(|s| *s < min_interval) {
        return refuse(
            "min_interval",
            format!(
                "{} was acted on {} ms ago, under min_interval_ms = {}",
                rule.target_key(),
                since.as_millis(),
                rule.min_interval_ms
            ),
        );
    }
    Verdict::Apply(command)
}

/// On/off as a field holds it.
fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" => Some(true),
        "0" | "false" | "off" => Some(false),
        other => other.parse::<f64>().ok().and_then(|n| {
            if n == 1.0 {
                Some(true)
            } else if n == 0.0 {
                Some(false)
            } else {
                None
            }
        }),
    }
}

/// The template with its placeholders filled (checked at config time).
pub fn fill(template: &str, rule: &DownlinkRule, entry: &EntryJson, value: &str) -> String {
    template
        .replace("{value}", value)
        .replace("{entry_id}", &entry.entry_id.to_string())
        .replace(
            "{created_at}",
            &thingspeak::format_timestamp(&entry.created_at),
        )
        .replace("{channel}", &entry.channel_id.to_string())
        .replace("{rule}", &rule.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: &str) -> DownlinkRule {
        toml::from_str(&format!(
            r#"
            name = "sp"
            channel = 7
            source = "field1"
            min = 5
            max = 30
            min_interval_ms = 1000
            max_age_secs = 60
            {action}
            "#
        ))
        .unwrap()
    }

    fn entry(id: u64, field1: Option<&str>, at: &str) -> EntryJson {
        let mut e = EntryJson::new(
            thingspeak::ChannelId::new(7).unwrap(),
            id,
            at.parse().unwrap(),
        );
        e.set("field1".parse().unwrap(), field1.map(str::to_owned));
        e
    }

    const NOW: &str = "2026-01-01T00:01:00Z";
    const MODBUS: &str = r#"action.modbus = { device = "plc", kind = "holding", address = 10, type = "i16", scale = 0.1 }"#;

    fn now() -> DateTime<Utc> {
        NOW.parse().unwrap()
    }

    #[test]
    fn a_setpoint_in_range_becomes_a_register_write() {
        let r = rule(MODBUS);
        let v = decide(
            &r,
            &entry(3, Some("21.5"), "2026-01-01T00:00:30Z"),
            Some(2),
            None,
            now(),
        );
        assert_eq!(
            v,
            Verdict::Apply(Command::Modbus {
                device: "plc".into(),
                value: WriteValue::Registers {
                    address: 10,
                    words: vec![215]
                }
            })
        );
    }

    #[test]
    fn every_check_refuses_with_its_reason() {
        let r = rule(MODBUS);
        let at = "2026-01-01T00:00:30Z";
        let reason = |v: Verdict| match v {
            Verdict::Refuse { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            decide(&r, &entry(3, Some("21.5"), at), Some(3), None, now()),
            Verdict::Ignore
        );
        assert_eq!(
            decide(&r, &entry(4, None, at), None, None, now()),
            Verdict::Ignore
        );
        assert_eq!(
            reason(decide(&r, &entry(4, Some("99"), at), None, None, now())),
            "above_max"
        );
        assert_eq!(
            reason(decide(&r, &entry(4, Some("4.9"), at), None, None, now())),
            "below_min"
        );
        assert_eq!(
            reason(decide(&r, &entry(4, Some("warm"), at), None, None, now())),
            "not_a_number"
        );
        assert_eq!(
            reason(decide(&r, &entry(4, Some("21.55"), at), None, None, now())),
            "not_representable"
        );
        let old = "2025-12-31T23:59:59Z";
        assert_eq!(
            reason(decide(&r, &entry(4, Some("21"), old), None, None, now())),
            "too_old"
        );
        let soon = Some(Duration::from_millis(400));
        assert_eq!(
            reason(decide(&r, &entry(4, Some("21"), at), None, soon, now())),
            "min_interval"
        );
        let later = Some(Duration::from_millis(1000));
        assert!(matches!(
            decide(&r, &entry(4, Some("21"), at), None, later, now()),
            Verdict::Apply(_)
        ));
    }

    #[test]
    fn coils_take_on_off_and_templates_are_filled() {
        let r = rule(r#"action.modbus = { device = "plc", kind = "coil", address = 2 }"#);
        let at = "2026-01-01T00:00:30Z";
        let mut r = r;
        r.min = None;
        r.max = None;
        for (text, on) in [("on", true), ("0", false), ("TRUE", true), ("1.0", true)] {
            assert_eq!(
                decide(&r, &entry(1, Some(text), at), None, None, now()),
                Verdict::Apply(Command::Modbus {
                    device: "plc".into(),
                    value: WriteValue::Coil {
                        address: 2,
                        value: on
                    }
                }),
                "{text}"
            );
        }
        assert!(matches!(
            decide(&r, &entry(1, Some("half"), at), None, None, now()),
            Verdict::Refuse {
                reason: "not_boolean",
                ..
            }
        ));
        let s = rule(
            r#"action.serial = { port = "ard", template = "SET {value} #{entry_id} {created_at} {channel} {rule}\n" }"#,
        );
        match decide(&s, &entry(9, Some("21"), at), None, None, now()) {
            Verdict::Apply(Command::Serial { bytes, .. }) => assert_eq!(
                String::from_utf8(bytes).unwrap(),
                "SET 21 #9 2026-01-01T00:00:30Z 7 sp\n"
            ),
            other => panic!("{other:?}"),
        }
    }
}
