//! Backslash escapes in configured byte strings (poll commands, line terminators).
//!
//! TOML basic strings already understand `\r`, `\n` and `\t` but not `\xNN`, and
//! environment variables understand nothing, so the serial source decodes the
//! usual escapes itself: `\r \n \t \0 \\ \xNN`. Text without a backslash passes
//! through byte for byte, so a TOML string that was already decoded is unchanged.

/// Decodes escapes into bytes. The error says which escape is wrong.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match (hex.len(), u8::from_str_radix(&hex, 16)) {
                    (2, Ok(byte)) => out.push(byte),
                    _ => return Err(format!("\\x{hex} is not \\x followed by two hex digits")),
                }
            }
            Some(other) => {
                return Err(format!(
                    "unknown escape \\{other} (use \\r \\n \\t \\0 \\\\ or \\xNN)"
                ))
            }
            None => return Err("a lone backslash ends the text (write \\\\)".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_escape() {
        assert_eq!(unescape(r"READ\r\n").unwrap(), b"READ\r\n");
        assert_eq!(unescape(r"\x02M\x03\t\0\\").unwrap(), b"\x02M\x03\t\0\\");
        assert_eq!(unescape("already\r\n").unwrap(), b"already\r\n");
        assert_eq!(unescape("é").unwrap(), "é".as_bytes());
    }

    #[test]
    fn bad_escapes_are_named() {
        assert!(unescape(r"\q").unwrap_err().contains(r"\q"));
        assert!(unescape(r"\x4").unwrap_err().contains(r"\x4"));
        assert!(unescape(r"\xZZ").unwrap_err().contains(r"\xZZ"));
        assert!(unescape("a\\").is_err());
    }
}
