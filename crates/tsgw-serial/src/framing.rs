//! Cutting a serial byte stream into lines, with bounded memory.
//!
//! A device that never sends the terminator (wrong baud rate, binary noise)
//! must not make the gateway buffer without end: once the pending bytes exceed
//! the maximum line length the line is reported as over-long, the bytes are
//! dropped, and everything up to the next terminator is skipped so that the
//! following line is read cleanly.
//!
//! Public so that the fuzz target `serial_framing` (in `fuzz/`) can drive it
//! with arbitrary bytes; inside the gateway only the port task uses it.

/// One unit cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line without its terminator and without surrounding `\r`.
    Line(Vec<u8>),
    /// A line longer than the maximum was dropped (reported once per line).
    Overlong,
}

/// Cuts a byte stream into [`Frame`]s at a terminator, holding at most one
/// line's worth of bytes between reads.
#[derive(Debug)]
pub struct LineFramer {
    terminator: Vec<u8>,
    max_line: usize,
    pending: Vec<u8>,
    /// True while skipping the rest of an over-long line.
    discarding: bool,
}

impl LineFramer {
    /// Lines longer than `max_line` bytes (counted before `\r` is trimmed)
    /// are reported as [`Frame::Overlong`].
    ///
    /// # Panics
    ///
    /// If `terminator` is empty; the port config rejects an empty terminator
    /// before a framer is made.
    pub fn new(terminator: Vec<u8>, max_line: usize) -> Self {
        assert!(!terminator.is_empty(), "line terminator must not be empty");
        Self {
            terminator,
            max_line,
            pending: Vec::new(),
            discarding: false,
        }
    }

    /// Feeds received bytes and appends the frames they complete to `out`.
    /// Memory held afterwards is at most `max_line + terminator.len()` bytes.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        self.pending.extend_from_slice(data);
        let tlen = self.terminator.len();
        let mut start = 0;
        while let Some(pos) = find(&self.pending[start..], &self.terminator) {
            let line = &self.pending[start..start + pos];
            if self.discarding {
                self.discarding = false;
            } else if line.len() > self.max_line {
                out.push(Frame::Overlong);
            } else {
                let line = trim_cr(line);
                if !line.is_empty() {
                    out.push(Frame::Line(line.to_vec()));
                }
            }
            start += pos + tlen;
        }
        self.pending.drain(..start);
        // Without a terminator in sight, keep only what could still be a line:
        // the tail that might be the start of a split terminator is kept so a
        // terminator arriving in two reads is still recognised.
        if self.pending.len() > self.max_line + tlen.saturating_sub(1) {
            if !self.discarding {
                out.push(Frame::Overlong);
                self.discarding = true;
            }
            let keep = tlen.saturating_sub(1);
            let cut = self.pending.len() - keep;
            self.pending.drain(..cut);
        }
    }

    /// Forgets a partial line, for a fresh start after a reconnect.
    pub fn clear(&mut self) {
        self.pending.clear();
        self.discarding = false;
    }

    /// Bytes held for a line not yet terminated: at most
    /// `max_line + terminator.len()` after any [`push`](Self::push).
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Devices end lines with `\r\n` or even `\n\r`; neither `\r` is part of the value.
fn trim_cr(mut line: &[u8]) -> &[u8] {
    while let [b'\r', rest @ ..] = line {
        line = rest;
    }
    while let [rest @ .., b'\r'] = line {
        line = rest;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut LineFramer, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut out = Vec::new();
        for chunk in chunks {
            framer.push(chunk, &mut out);
        }
        out
    }

    fn line(s: &str) -> Frame {
        Frame::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn splits_lines_across_reads_and_strips_cr() {
        let mut f = LineFramer::new(b"\n".to_vec(), 16);
        let out = frames(&mut f, &[b"t=1\r\nh=", b"2\n\r\n\n\rx=3\r", b"\n"]);
        assert_eq!(out, vec![line("t=1"), line("h=2"), line("x=3")]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn multi_byte_terminator_split_between_reads() {
        let mut f = LineFramer::new(b"\x03\x02".to_vec(), 8);
        let out = frames(&mut f, &[b"abc\x03", b"\x02def\x03\x02"]);
        assert_eq!(out, vec![line("abc"), line("def")]);
    }

    #[test]
    fn overlong_line_is_dropped_once_and_next_line_is_clean() {
        let mut f = LineFramer::new(b"\n".to_vec(), 8);
        let long = [b'x'; 100];
        let out = frames(&mut f, &[&long, &long, b"tail\nok=1\n"]);
        assert_eq!(out, vec![Frame::Overlong, line("ok=1")]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn overlong_line_within_one_read_is_reported() {
        let mut f = LineFramer::new(b"\n".to_vec(), 4);
        let out = frames(&mut f, &[b"12345\n1234\n"]);
        assert_eq!(out, vec![Frame::Overlong, line("1234")]);
    }

    proptest::proptest! {
        /// However the stream is cut into reads, the frames are the same:
        /// each line is either delivered whole or reported over-long once.
        #[test]
        fn chunking_never_changes_the_frames(
            lines in proptest::collection::vec("[a-z0-9=,. ]{0,40}", 0..20),
            cuts in proptest::collection::vec(1usize..50, 1..10),
        ) {
            let max = 24;
            let stream: Vec<u8> = lines.iter().flat_map(|l| [l.as_bytes(), b"\r\n"].concat()).collect();
            let expected: Vec<Frame> = lines
                .iter()
                .filter_map(|l| {
                    let trimmed = l.as_bytes();
                    if trimmed.len() > max {
                        Some(Frame::Overlong)
                    } else if trimmed.is_empty() {
                        None
                    } else {
                        Some(Frame::Line(trimmed.to_vec()))
                    }
                })
                .collect();
            let mut f = LineFramer::new(b"\r\n".to_vec(), max);
            let mut out = Vec::new();
            let mut rest = stream.as_slice();
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                f.push(&rest[..n], &mut out);
                proptest::prop_assert!(f.buffered() <= max + 1);
                rest = &rest[n..];
                i += 1;
            }
            proptest::prop_assert_eq!(out, expected);
            proptest::prop_assert_eq!(f.buffered(), 0);
        }
    }

    #[test]
    #[should_panic(expected = "line terminator must not be empty")]
    fn an_empty_terminator_is_refused() {
        LineFramer::new(Vec::new(), 8);
    }

    #[test]
    fn self_overlapping_terminator_matches_leftmost_across_reads() {
        // "aab" inside "aaab": the match starts at the second `a`, so the line
        // is "a" however the bytes are split.
        for split in 0..=6 {
            let stream = b"aaabx\n";
            let mut f = LineFramer::new(b"aab".to_vec(), 8);
            let out = frames(&mut f, &[&stream[..split], &stream[split..]]);
            assert_eq!(out, vec![line("a")], "split at {split}");
            assert_eq!(f.buffered(), 2, "split at {split}");
        }
    }

    #[test]
    fn memory_stays_bounded_without_terminator() {
        let mut f = LineFramer::new(b"\r\n".to_vec(), 64);
        let noise = [0xAAu8; 512];
        let mut out = Vec::new();
        for _ in 0..10_000 {
            f.push(&noise, &mut out);
            assert!(f.buffered() <= 64 + 2);
        }
        assert_eq!(out, vec![Frame::Overlong]);
        f.clear();
        f.push(b"a\r\n", &mut out);
        assert_eq!(out.last(), Some(&line("a")));
    }
}
