//! Compiled mapping rules: which topic feeds which channel targets, and how.

use tsgw_core::extract::{Extraction, Extractor, FormatError};

use crate::config::RuleConfig;
use crate::filter::{FilterError, TopicFilter};

/// A rule whose filter and parser were checked.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub filter: TopicFilter,
    pub extractor: Extractor,
}

/// A config rule that cannot be used; names the rule and the key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("mqtt.rules[{index}] ({name:?}).topic: {source}")]
    Filter {
        index: usize,
        name: String,
        source: FilterError,
    },
    #[error("mqtt.rules[{index}] ({name:?}): {source}")]
    Format {
        index: usize,
        name: String,
        source: FormatError,
    },
    #[error("mqtt.rules[{index}].name is empty")]
    EmptyName { index: usize },
}

/// All rules, in config order. The first matching rule wins, so specific
/// filters should come before broad ones.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    pub fn compile(configs: &[RuleConfig]) -> Result<Self, RuleError> {
        let rules = configs
            .iter()
            .enumerate()
            .map(|(index, cfg)| {
                if cfg.name.trim().is_empty() {
                    return Err(RuleError::EmptyName { index });
                }
                let filter = TopicFilter::new(&cfg.topic).map_err(|source| RuleError::Filter {
                    index,
                    name: cfg.name.clone(),
                    source,
                })?;
                let extractor = Extractor::compile(&cfg.parser, cfg.channel).map_err(|source| {
                    RuleError::Format {
                        index,
                        name: cfg.name.clone(),
                        source,
                    }
                })?;
                Ok(Rule {
                    name: cfg.name.clone(),
                    filter,
                    extractor,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { rules })
    }

    /// The first rule whose filter matches `topic`.
    pub fn find(&self, topic: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.filter.matches(topic))
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl Rule {
    pub fn apply(&self, payload: &[u8]) -> Extraction {
        self.extractor.extract(payload)
    }
}
