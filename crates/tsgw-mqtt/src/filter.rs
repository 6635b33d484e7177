//! MQTT topic filters with `+` and `#` wildcards, checked once at config time.

use std::fmt;

/// A validated MQTT topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("topic filter is empty")]
    Empty,
    #[error("topic filter {0:?}: '#' must be the last level and stand alone")]
    BadMultiLevel(String),
    #[error("topic filter {0:?}: '+' must stand alone in its level")]
    BadSingleLevel(String),
}

impl TopicFilter {
    pub fn new(text: &str) -> Result<Self, FilterError> {
        if text.is_empty() {
            return Err(FilterError::Empty);
        }
        let levels: Vec<&str> = text.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(FilterError::BadMultiLevel(text.to_owned()));
            }
            if level.contains('+') && *level != "+" {
                return Err(FilterError::BadSingleLevel(text.to_owned()));
            }
        }
        Ok(Self {
            text: text.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether every topic that `requested` (itself a filter) can match is
    /// matched by this filter too: a subscription ACL grants `requested`
    /// only then. `sensors/#` covers `sensors/+/t` but not `#`.
    pub fn covers(&self, requested: &TopicFilter) -> bool {
        let mut allowed = self.text.split('/');
        let mut wanted = requested.text.split('/');
        let mut first = true;
        loop {
            match (allowed.next(), wanted.next()) {
                // `$SYS/...` is reached only by naming `$` literally (§4.7.2).
                (Some("#" | "+"), Some(w)) if first && w.starts_with('$') => return false,
                (Some("#"), _) => return true,
                (Some("+"), Some(w)) if w != "#" => {}
                (Some(a), Some(w)) if a == w && a != "+" => {}
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }

    /// Whether `topic` matches. Topics starting with `$` match only filters
    /// that name the `$` level literally (MQTT 3.1.1 §4.7.2).
    pub fn matches(&self, topic: &str) -> bool {
        let mut filter_levels = self.text.split('/');
        let mut topic_levels = topic.split('/');
        let mut first = true;
        loop {
            match (filter_levels.next(), topic_levels.next()) {
                (Some("#"), Some(t)) => return !(first && t.starts_with('$')),
                // "a/#" also matches "a" itself.
                (Some("#"), None) => return true,
                (Some("+"), Some(t)) => {
                    if first && t.starts_with('$') {
                        return false;
                    }
                }
                (Some(f), Some(t)) if f == t => {}
                (None, None) => return true,
                _ => return false,
            }
            first = false;
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, topic: &str) -> bool {
        TopicFilter::new(filter).unwrap().matches(topic)
    }

    #[test]
    fn wildcards() {
        assert!(m("sensors/+/climate", "sensors/kitchen/climate"));
        assert!(!m("sensors/+/climate", "sensors/kitchen/x/climate"));
        assert!(m("sensors/#", "sensors"));
        assert!(m("sensors/#", "sensors/a/b/c"));
        assert!(m("#", "anything/at/all"));
        assert!(!m("#", "$SYS/broker"));
        assert!(!m("+/x", "$SYS/x"));
        assert!(m("a/b", "a/b"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(m("+", ""));
    }

    #[test]
    fn invalid_filters_are_rejected() {
        for bad in ["", "a/#/b", "a#", "a/b+", "+a/b"] {
            assert!(TopicFilter::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn covers(allowed: &str, requested: &str) -> bool {
        TopicFilter::new(allowed)
            .unwrap()
            .covers(&TopicFilter::new(requested).unwrap())
    }

    #[test]
    fn coverage_of_one_filter_by_another() {
        assert!(covers("#", "a/b"));
        assert!(covers("#", "#"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/#"));
        assert!(covers("a/+", "a/b"));
        assert!(covers("a/+", "a/+"));
        assert!(covers("a/b", "a/b"));
        assert!(!covers("a/#", "#"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/+", "a/b/c"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/b", "a"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/x"));
    }
}
