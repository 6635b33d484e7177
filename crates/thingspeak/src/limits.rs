//! ThingSpeak's documented limits, as constants and small checks returning
//! typed errors. The emulator enforces them; the gateway respects them.

use std::time::Duration;

use crate::ids::FIELD_COUNT;

/// Data fields a channel has.
pub const MAX_FIELDS: usize = FIELD_COUNT as usize;
/// Longest value of one field (or status), bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 255;
/// Longest MQTT message payload, bytes.
pub const MAX_MESSAGE_BYTES: usize = 3000;
/// Parameter names a channel-feed payload may carry.
pub const PARAM_NAMES: [&str; 13] = [
    "field1",
    "field2",
    "field3",
    "field4",
    "field5",
    "field6",
    "field7",
    "field8",
    "status",
    "lat",
    "long",
    "elevation",
    "created_at",
];
/// ThingSpeak closes connections idle for this long (pings may not count).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Channels a free licence may have.
pub const FREE_MAX_CHANNELS: usize = 4;
/// The only MQTT protocol level ThingSpeak speaks (3.1.1).
pub const MQTT_PROTOCOL_LEVEL: u8 = 4;
/// CONNACK return code ThingSpeak answers a rule-breaking CONNECT with ("not authorised").
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;
/// CONNACK return code for bad credentials.
pub const CONNACK_BAD_CREDENTIALS: u8 = 4;

/// Minimum time between bulk REST calls of one channel.
pub const BULK_MIN_INTERVAL: Duration = Duration::from_secs(15);

/// A ThingSpeak licence class: decides the update interval and bulk sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum License {
    #[default]
    Free,
    Paid,
}

impl License {
    /// Minimum time between two updates of one channel (MQTT and REST together).
    pub fn update_interval(self) -> Duration {
        match self {
            License::Free => Duration::from_secs(15),
            License::Paid => Duration::from_secs(1),
        }
    }

    /// Most updates one bulk_update.json call may carry.
    pub fn bulk_max_updates(self) -> usize {
        match self {
            License::Free => 960,
            License::Paid => 14_400,
        }
    }
}

/// True for a name allowed in a channel-feed payload.
pub fn is_allowed_name(name: &str) -> bool {
    PARAM_NAMES.contains(&name)
}

/// A CONNECT ThingSpeak refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectViolation {
    #[error("MQTT protocol level {0} is not supported (ThingSpeak speaks 3.1.1, level 4)")]
    ProtocolLevel(u8),
    #[error("clean session must be set")]
    CleanSessionOff,
    #[error("a Will message is not allowed")]
    WillPresent,
}

impl ConnectViolation {
    /// The CONNACK return code ThingSpeak answers with.
    pub fn connack_code(self) -> u8 {
        CONNACK_NOT_AUTHORIZED
    }
}

/// Checks a CONNECT against ThingSpeak's rules (3.1.1, clean session, no Will).
pub fn check_connect(
    protocol_level: u8,
    clean_session: bool,
    will_present: bool,
) -> Result<(), ConnectViolation> {
    if protocol_level != MQTT_PROTOCOL_LEVEL {
        return Err(ConnectViolation::ProtocolLevel(protocol_level));
    }
    if !clean_session {
        return Err(ConnectViolation::CleanSessionOff);
    }
    if will_present {
        return Err(ConnectViolation::WillPresent);
    }
    Ok(())
}

/// A PUBLISH ThingSpeak does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishViolation {
    #[error("QoS {0} is not supported, only QoS 0")]
    Qos(u8),
    #[error("the retain flag must not be set")]
    Retain,
    #[error("payload is {0} bytes, at most {MAX_MESSAGE_BYTES} are allowed")]
    TooLarge(usize),
}

/// Checks a PUBLISH's flags and size.
pub fn check_publish(qos: u8, retain: bool, payload_len: usize) -> Result<(), PublishViolation> {
    if qos != 0 {
        return Err(PublishViolation::Qos(qos));
    }
    if retain {
        return Err(PublishViolation::Retain);
    }
    check_message_len(payload_len)
}

/// Checks a message payload's size.
pub fn check_message_len(len: usize) -> Result<(), PublishViolation> {
    if len > MAX_MESSAGE_BYTES {
        return Err(PublishViolation::TooLarge(len));
    }
    Ok(())
}

/// A value longer than [`MAX_VALUE_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("value of {name} is {len} bytes, at most {MAX_VALUE_BYTES} are allowed")]
pub struct ValueTooLong {
    pub name: String,
    pub len: usize,
}

/// Checks one value's length. `name` is the parameter it is for (for the message).
pub fn check_value(name: &str, value: &str) -> Result<(), ValueTooLong> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ValueTooLong {
            name: name.to_owned(),
            len: value.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rules() {
        assert_eq!(check_connect(4, true, false), Ok(()));
        assert_eq!(
            check_connect(4, false, false),
            Err(ConnectViolation::CleanSessionOff)
        );
        assert_eq!(
            check_connect(4, true, true),
            Err(ConnectViolation::WillPresent)
        );
        // mosquitto bridges send 0x84 (bridge bit + level 4).
        assert_eq!(
            check_connect(0x84, true, false),
            Err(ConnectViolation::ProtocolLevel(0x84))
        );
        assert_eq!(ConnectViolation::WillPresent.connack_code(), 5);
    }

    #[test]
    fn publish_rules() {
        assert_eq!(check_publish(0, false, 3000), Ok(()));
        assert_eq!(check_publish(1, false, 1), Err(PublishViolation::Qos(1)));
        assert_eq!(check_publish(0, true, 1), Err(PublishViolation::Retain));
        assert_eq!(
            check_publish(0, false, 3001),
            Err(PublishViolation::TooLarge(3001))
        );
    }

    #[test]
    fn values_and_names() {
        assert!(check_value("field1", &"x".repeat(255)).is_ok());
        let e = check_value("field1", &"x".repeat(256)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "value of field1 is 256 bytes, at most 255 are allowed"
        );
        assert!(is_allowed_name("created_at"));
        assert!(!is_allowed_name("field9"));
        assert_eq!(License::Free.update_interval(), Duration::from_secs(15));
        assert_eq!(License::Paid.bulk_max_updates(), 14_400);
    }
}
