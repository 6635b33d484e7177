//! What one kind of client may publish and subscribe to, checked at the front.

use std::collections::BTreeSet;

use thingspeak::ChannelId;

use crate::config::AclConfig;
use crate::filter::{FilterError, TopicFilter};

/// Compiled permissions. `None` in a field means "no restriction".
#[derive(Debug, Clone, Default)]
pub struct Acl {
    channels: Option<BTreeSet<ChannelId>>,
    publish: Option<Vec<TopicFilter>>,
    subscribe: Option<Vec<TopicFilter>>,
}

/// An ACL filter that is not a valid MQTT filter; names the config key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}[{index}]: {source}")]
pub struct AclError {
    pub key: String,
    pub index: usize,
    pub source: FilterError,
}

impl Acl {
    /// `key` names the config table in errors, e.g. `mqtt.users.plc`.
    pub fn compile(config: &AclConfig, key: &str) -> Result<Acl, AclError> {
        let filters = |list: &Option<Vec<String>>, name: &str| {
            list.as_ref()
                .map(|list| {
                    list.iter()
                        .enumerate()
                        .map(|(index, text)| {
                            TopicFilter::new(text).map_err(|source| AclError {
                                key: format!("{key}.{name}"),
                                index,
                                source,
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
        };
        Ok(Acl {
            channels: config
                .channels
                .as_ref()
                .map(|c| c.iter().copied().collect()),
            publish: filters(&config.publish, "publish")?,
            subscribe: filters(&config.subscribe, "subscribe")?,
        })
    }

    /// A drop-in publish to `channel`.
    pub fn may_publish_channel(&self, channel: ChannelId) -> bool {
        self.channels.as_ref().is_none_or(|c| c.contains(&channel))
    }

    /// A publish outside ThingSpeak's namespace.
    pub fn may_publish_topic(&self, topic: &str) -> bool {
        self.publish
            .as_ref()
            .is_none_or(|filters| filters.iter().any(|f| f.matches(topic)))
    }

    /// A subscription to `filter`: granted only if an allowed filter covers all of it.
    pub fn may_subscribe(&self, filter: &TopicFilter) -> bool {
        self.subscribe
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|a| a.covers(filter)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(toml_text: &str) -> Acl {
        Acl::compile(&toml::from_str(toml_text).unwrap(), "mqtt.users.t").unwrap()
    }

    #[test]
    fn no_lists_means_no_restriction() {
        let open = acl("");
        assert!(open.may_publish_channel(ChannelId::new(1).unwrap()));
        assert!(open.may_publish_topic("any/thing"));
        assert!(open.may_subscribe(&TopicFilter::new("#").unwrap()));
    }

    #[test]
    fn lists_restrict() {
        let plc = acl(r#"
            channels = [42]
            publish = ["plc/+/state"]
            subscribe = ["plc/#"]
            "#);
        assert!(plc.may_publish_channel(ChannelId::new(42).unwrap()));
        assert!(!plc.may_publish_channel(ChannelId::new(43).unwrap()));
        assert!(plc.may_publish_topic("plc/1/state"));
        assert!(!plc.may_publish_topic("plc/1/other"));
        assert!(plc.may_subscribe(&TopicFilter::new("plc/+/cmd").unwrap()));
        assert!(!plc.may_subscribe(&TopicFilter::new("#").unwrap()));
        // An empty list allows nothing.
        assert!(!acl("subscribe = []").may_subscribe(&TopicFilter::new("a").unwrap()));
    }

    #[test]
    fn a_bad_filter_names_its_key_and_position() {
        let err = Acl::compile(
            &toml::from_str(r#"subscribe = ["ok", "a/#/b"]"#).unwrap(),
            "mqtt.users.plc",
        )
        .unwrap_err();
        assert_eq!(err.key, "mqtt.users.plc.subscribe");
        assert_eq!(err.index, 1);
    }
}
