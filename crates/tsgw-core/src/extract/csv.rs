//! Header-less delimited lines, as loggers print them: `21.5,40,1013`.
//!
//! Each configured column index (0 = first column) feeds one destination.
//! Double-quoted cells are understood (`"a,b"`, `""` for a literal quote) because
//! some devices quote text columns; everything else is split verbatim.

use super::{parse_timestamp, Destination, ExtractError, Extracted, Extraction, FormatError};
use crate::reading::Value;

#[derive(Debug, Clone)]
pub struct Csv {
    columns: Vec<(usize, Destination)>,
    separator: String,
    time_column: Option<usize>,
}

impl Csv {
    /// `columns` keys are the column numbers as written in the config (`"0"`, `"3"`).
    pub(super) fn new(
        columns: Vec<(String, Destination)>,
        separator: String,
        time_column: Option<usize>,
    ) -> Result<Self, FormatError> {
        if separator.is_empty() {
            return Err(FormatError::EmptySeparator);
        }
        if separator.contains('"') {
            return Err(FormatError::Invalid(
                "CSV separator must not contain '\"' (it quotes cells)".into(),
            ));
        }
        let columns = columns
            .into_iter()
            .map(|(key, destination)| match parse_column(&key) {
                Some(index) => Ok((index, destination)),
                None => Err(FormatError::Invalid(format!(
                    "CSV column {key:?} is not a column number (0 is the first column)"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            columns,
            separator,
            time_column,
        })
    }

    pub(super) fn extract(&self, text: &str) -> Extraction {
        let mut out = Extraction::default();
        let cells = split_cells(text, &self.separator);
        let measured_at = self.time_column.and_then(|column| match cells.get(column) {
            Some(cell) => match parse_timestamp(cell) {
                Ok(t) => Some(t),
                Err(e) => {
                    out.errors.push(e);
                    None
                }
            },
            None => {
                out.errors.push(ExtractError::MissingColumn {
                    column,
                    columns: cells.len(),
                });
                None
            }
        });
        for (column, destination) in &self.columns {
            let cell = match cells.get(*column) {
                Some(cell) => cell.trim(),
                None => {
                    out.errors.push(ExtractError::MissingColumn {
                        column: *column,
                        columns: cells.len(),
                    });
                    continue;
                }
            };
            if cell.is_empty() {
                // An empty cell means "no value this time", which devices use on purpose.
                continue;
            }
            match destination.apply(Value::from_text(cell)) {
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

/// Digits only: `u32::from_str` would also accept `+3`.
fn parse_column(key: &str) -> Option<usize> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    key.parse().ok()
}

/// Splits on `separator`, honouring double-quoted cells. An unterminated quote
/// runs to the end of the line rather than failing the whole line.
fn split_cells(text: &str, separator: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut in_quotes = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_quotes {
            if let Some(after) = rest.strip_prefix("\"\"") {
                cell.push('"');
                rest = after;
                continue;
            }
            rest = &rest[c.len_utf8()..];
            if c == '"' {
                in_quotes = false;
            } else {
                cell.push(c);
            }
            continue;
        }
        if let Some(after) = rest.strip_prefix(separator) {
            cells.push(std::mem::take(&mut cell));
            rest = after;
            continue;
        }
        rest = &rest[c.len_utf8()..];
        if c == '"' && cell.trim().is_empty() {
            cell.clear();
            in_quotes = true;
        } else {
            cell.push(c);
        }
    }
    cells.push(cell);
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(columns: &[(&str, &str)], separator: &str) -> Result<Csv, FormatError> {
        let columns = crate::extract::test_mapping(columns, 1.0);
        Csv::new(columns, separator.into(), Some(3))
    }

    #[test]
    fn columns_feed_their_fields() {
        let c = csv(&[("0", "field1"), ("2", "field2"), ("1", "status")], ",").unwrap();
        let out = c.extract("21.5, ok ,40,1767323045");
        assert_eq!(out.errors, vec![]);
        let values: Vec<_> = out.values.iter().map(|v| v.value.clone()).collect();
        assert_eq!(
            values,
            vec![
                Value::Number(21.5),
                Value::Number(40.0),
                Value::Text("ok".into())
            ]
        );
        assert_eq!(
            out.values[0].measured_at.unwrap().timestamp(),
            1_767_323_045
        );
    }

    #[test]
    fn short_lines_keep_the_columns_they_have() {
        let c = csv(&[("0", "field1"), ("5", "field2")], ";").unwrap();
        let out = c.extract("7;8");
        assert_eq!(out.values.len(), 1);
        assert_eq!(out.values[0].value, Value::Number(7.0));
        assert!(out.errors.contains(&ExtractError::MissingColumn {
            column: 5,
            columns: 2
        }));
        // The time column (3) is missing too.
        assert_eq!(out.errors.len(), 2);
    }

    #[test]
    fn quoted_cells_may_hold_the_separator() {
        assert_eq!(
            split_cells(r#"1,"a,b","say ""hi""",""#, ","),
            vec!["1", "a,b", r#"say "hi""#, ""]
        );
        assert_eq!(split_cells("a\t\tb", "\t"), vec!["a", "", "b"]);
        assert_eq!(split_cells("x,\"open", ","), vec!["x", "open"]);
    }

    #[test]
    fn empty_cells_are_skipped_not_errors() {
        let c = csv(&[("0", "field1"), ("1", "field2")], ",").unwrap();
        let out = c.extract(",3,x,1767323045");
        assert_eq!(out.errors, vec![]);
        assert_eq!(out.values.len(), 1);
    }

    #[test]
    fn bad_column_keys_and_separators_are_config_errors() {
        assert!(matches!(
            csv(&[("+1", "field1")], ","),
            Err(FormatError::Invalid(m)) if m.contains("\"+1\"")
        ));
        assert!(matches!(
            csv(&[("one", "field1")], ","),
            Err(FormatError::Invalid(_))
        ));
        assert_eq!(
            csv(&[("0", "field1")], "").unwrap_err(),
            FormatError::EmptySeparator
        );
    }

    #[test]
    fn multibyte_text_never_panics() {
        let c = csv(&[("0", "field1")], "é").unwrap();
        assert_eq!(split_cells("ééé\"ü\"\"é", "é"), vec!["", "", "", "ü\"é"]);
        let out = c.extract("ééé\"ü\"\"é");
        assert!(out.values.is_empty());
        assert!(matches!(out.errors[..], [ExtractError::BadTime(_)]));
        assert_eq!(split_cells("aéb", "é"), vec!["a", "b"]);
    }
}
