//! Config errors in the user's words.
//!
//! figment names a key by its internal path ("default.queue.bogus_key": the
//! `default.` is its profile) and an environment variable by a reconstructed
//! key ("UPSTREAM.UPDATE_INTERVAL_SECS"). A user wrote neither. This module
//! names what they wrote: the file and line of the key (found with
//! toml_edit's spans, since figment keeps none), or the environment variable
//! exactly as it is set (`TSGW_UPSTREAM__UPDATE_INTERVAL_SECS`), or the
//! systemd credential file.

use std::path::Path;

use figment::error::{Actual, Kind};
use figment::Source;

/// Where the values that can fail came from, besides figment's own metadata.
pub struct Origins<'a> {
    /// The prefix of config environment variables (`TSGW_`).
    pub env_prefix: &'a str,
    /// `$CREDENTIALS_DIRECTORY` and the credential names (dotted keys) in it.
    pub credentials: Option<(&'a Path, Vec<String>)>,
}

/// One line per error: where (file and line, variable, credential), then what.
pub fn describe(error: figment::Error, origins: &Origins<'_>) -> String {
    error
        .into_iter()
        .map(|e| describe_one(&e, origins))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe_one(e: &figment::Error, origins: &Origins<'_>) -> String {
    let mut path = e.path.clone();
    if let Kind::MissingField(field) = &e.kind {
        path.push(field.to_string());
    }
    let key = dotted(&path);
    let what = what_went_wrong(&e.kind, &key);
    match locate(e, &path, origins) {
        Some(place) => format!("{place}: {what}"),
        None => what,
    }
}

/// `serial[0].baud`: the key as the TOML reads, array items by index.
fn dotted(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        if segment.parse::<usize>().is_ok() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Where the failing value was written, in the user's terms.
fn locate(e: &figment::Error, path: &[String], origins: &Origins<'_>) -> Option<String> {
    let metadata = e.metadata.as_ref()?;
    if let Some(Source::File(file)) = &metadata.source {
        let line = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| line_of(&text, path));
        return Some(match line {
            Some(line) => format!("{}, line {line}", file.display()),
            None => file.display().to_string(),
        });
    }
    if metadata.name.contains("environment variable") {
        return Some(match env_var_for(origins.env_prefix, path) {
            Some(var) => format!("environment variable {var}"),
            None => format!(
                "environment variable {}{}",
                origins.env_prefix,
                path.join("__").to_uppercase()
            ),
        });
    }
    if let Some((dir, names)) = &origins.credentials {
        let dotted = path.join(".");
        if let Some(name) = names.iter().find(|n| dotted.starts_with(n.as_str())) {
            return Some(format!("credential file {}", dir.join(name).display()));
        }
    }
    Some(metadata.name.to_string())
}

/// The environment variable that set the key at `path`, spelled as it is set.
/// figment matches the prefix without regard to case and lowercases the rest.
fn env_var_for(prefix: &str, path: &[String]) -> Option<String> {
    let wanted = path.join("__");
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .find(|name| {
            let trimmed = name.trim();
            trimmed.len() > prefix.len()
                && trimmed.is_char_boundary(prefix.len())
                && trimmed[..prefix.len()].eq_ignore_ascii_case(prefix)
                && trimmed[prefix.len()..].eq_ignore_ascii_case(&wanted)
        })
}

/// The 1-based line where the deepest part of `path` that exists in the TOML
/// `text` is written: the key itself, or its table when the key is missing.
pub fn line_of(text: &str, path: &[String]) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item().clone();
    let mut span = None;
    for segment in path {
        let next = if let Some(table) = item.as_table_like() {
            let Some((key, value)) = table.get_key_value(segment) else {
                break;
            };
            span = key.span().or_else(|| value.span()).or(span);
            value.clone()
        } else if let Some(tables) = item.as_array_of_tables() {
            let Some(table) = segment.parse().ok().and_then(|i: usize| tables.get(i)) else {
                break;
            };
            span = table.span().or(span);
            toml_edit::Item::Table(table.clone())
        } else if let Some(array) = item.as_array() {
            let Some(value) = segment.parse().ok().and_then(|i: usize| array.get(i)) else {
                break;
            };
            span = value.span().or(span);
            toml_edit::Item::Value(value.clone())
        } else {
            break;
        };
        item = next;
    }
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// The error itself, naming the dotted key without figment's profile.
fn what_went_wrong(kind: &Kind, key: &str) -> String {
    let secret = looks_secret(key);
    let found = |actual: &Actual| {
        if secret {
            "a value (not shown: the key may hold a secret)".to_owned()
        } else {
            actual.to_string()
        }
    };
    match kind {
        Kind::UnknownField(_, expected) => format!(
            "unknown key \"{key}\" (expected one of: {}; check the spelling against config/gateway.example.toml)",
            expected.join(", ")
        ),
        Kind::MissingField(_) => format!("missing key \"{key}\""),
        Kind::InvalidType(actual, expected) => format!(
            "\"{key}\" must be {}, found {}",
            plain_type(expected),
            found(actual)
        ),
        Kind::InvalidValue(actual, expected) => format!(
            "\"{key}\" has an invalid value {}: expected {}",
            found(actual),
            plain_type(expected)
        ),
        Kind::UnknownVariant(value, expected) => format!(
            "\"{key}\" cannot be {value:?} (expected one of: {})",
            expected.join(", ")
        ),
        Kind::InvalidLength(len, expected) => {
            format!("\"{key}\" has {len} items, expected {expected}")
        }
        Kind::Message(message) if key.is_empty() => message.clone(),
        other => format!("\"{key}\": {other}"),
    }
}

/// serde's names for primitive types, in words.
fn plain_type(expected: &str) -> String {
    match expected {
        "f32" | "f64" => "a number".to_owned(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => {
            format!("a whole number from 0 ({expected})")
        }
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => format!("a whole number ({expected})"),
        other => other.to_owned(),
    }
}

/// Values of these keys are never echoed in an error.
fn looks_secret(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|word| last.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    const TEXT: &str = r#"# a comment
[upstream]
client_id = "c"
update_interval_secs = "fast"

[queue]
dir = "/tmp/q"
bogus_key = 3

[[serial]]
name = "a"

[[serial]]
name = "b"
parser = { format = "plain", target = "field9" }
transport.tcp.address = "x"
"#;

    #[test]
    fn keys_are_found_on_their_lines() {
        assert_eq!(
            line_of(TEXT, &path("upstream.update_interval_secs")),
            Some(4)
        );
        assert_eq!(line_of(TEXT, &path("queue.bogus_key")), Some(8));
        assert_eq!(line_of(TEXT, &path("serial.1.name")), Some(14));
        assert_eq!(line_of(TEXT, &path("serial.1.parser.target")), Some(15));
        assert_eq!(
            line_of(TEXT, &path("serial.1.transport.tcp.address")),
            Some(16)
        );
    }

    #[test]
    fn a_missing_key_points_at_its_table() {
        assert_eq!(line_of(TEXT, &path("queue.max_bytes")), Some(6));
        assert_eq!(line_of(TEXT, &path("nosuch")), None);
    }

    #[test]
    fn array_items_are_indexed_in_keys() {
        assert_eq!(dotted(&path("serial.0.baud")), "serial[0].baud");
        assert_eq!(dotted(&path("queue.dir")), "queue.dir");
    }

    #[test]
    fn messages_name_the_key_in_words() {
        let msg = what_went_wrong(
            &Kind::InvalidType(Actual::Str("fast".into()), "f64".into()),
            "upstream.update_interval_secs",
        );
        assert_eq!(
            msg,
            "\"upstream.update_interval_secs\" must be a number, found string \"fast\""
        );
        let msg = what_went_wrong(
            &Kind::UnknownField("bogus_key".into(), &["dir", "max_bytes"]),
            "queue.bogus_key",
        );
        assert!(
            msg.starts_with("unknown key \"queue.bogus_key\" (expected one of: dir, max_bytes;"),
            "{msg}"
        );
    }

    #[test]
    fn secret_values_are_not_echoed() {
        let msg = what_went_wrong(
            &Kind::InvalidType(Actual::Unsigned(12345678), "a string".into()),
            "upstream.password",
        );
        assert!(!msg.contains("12345678"), "{msg}");
    }
}
