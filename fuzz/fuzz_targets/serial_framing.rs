//! Serial line framing: any bytes, any terminator, cut into reads at any points.
//!
//! Input layout: `[max_line, term_len, term.., n_cuts, cuts.., stream..]`.
//! The oracle is a whole-stream model of what the framer promises: the stream
//! is split at each leftmost terminator; a complete line longer than the
//! maximum is one `Overlong`, any other is `\r`-trimmed and delivered unless
//! empty; an unterminated tail is reported as `Overlong` once it can no longer
//! fit. Equality with that model means no byte is lost, duplicated or moved
//! between lines by the way the stream was cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tsgw_serial::framing::{Frame, LineFramer};

/// One fuzz case, cut from the raw input.
struct Case<'a> {
    max_line: usize,
    terminator: &'a [u8],
    /// Read sizes, used in turn (an empty list means one read of everything).
    cuts: &'a [u8],
    stream: &'a [u8],
}

fn layout(data: &[u8]) -> Option<Case<'_>> {
    let (&max_byte, rest) = data.split_first()?;
    // 0..=63: small enough that over-long lines are common; 0 is not a valid
    // config but the framer must still behave.
    let max_line = usize::from(max_byte % 64);
    let (&tlen, rest) = rest.split_first()?;
    let tlen = 1 + usize::from(tlen % 4);
    let (terminator, rest) = rest.split_at_checked(tlen)?;
    let (&ncuts, rest) = rest.split_first()?;
    let (cuts, stream) = rest.split_at_checked(usize::from(ncuts % 16))?;
    Some(Case {
        max_line,
        terminator,
        cuts,
        stream,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    let start = line.iter().position(|&b| b != b'\r').unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|&b| b != b'\r')
        .map_or(start, |e| e + 1);
    &line[start..end.max(start)]
}

/// The frames for the whole stream, and the unterminated tail.
fn model<'a>(stream: &'a [u8], terminator: &[u8], max_line: usize) -> (Vec<Frame>, &'a [u8]) {
    let mut frames = Vec::new();
    let mut rest = stream;
    while let Some(pos) = find(rest, terminator) {
        let line = &rest[..pos];
        if line.len() > max_line {
            frames.push(Frame::Overlong);
        } else if !trim_cr(line).is_empty() {
            frames.push(Frame::Line(trim_cr(line).to_vec()));
        }
        rest = &rest[pos + terminator.len()..];
    }
    // The tail's last `terminator.len() - 1` bytes may still begin a
    // terminator; anything beyond `max_line` before them is surely too long.
    if rest.len() > max_line + terminator.len() - 1 {
        frames.push(Frame::Overlong);
    }
    (frames, rest)
}

fuzz_target!(|data: &[u8]| {
    let Some(Case {
        max_line,
        terminator,
        cuts,
        stream,
    }) = layout(data)
    else {
        return;
    };
    let mut framer = LineFramer::new(terminator.to_vec(), max_line);
    let mut out = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        // A cut of 0 is an empty read, which must change nothing.
        let n = cuts
            .get(i % cuts.len().max(1))
            .map_or(rest.len(), |&c| usize::from(c))
            .min(rest.len());
        framer.push(&rest[..n], &mut out);
        assert!(
            framer.buffered() <= max_line + terminator.len(),
            "{} bytes buffered, max_line {max_line}, terminator {terminator:?}",
            framer.buffered()
        );
        rest = &rest[n..];
        i += 1;
        // Cuts of only zeros would never finish: after as many reads as there
        // are bytes, the rest goes in as one read.
        if i > stream.len() + cuts.len() {
            framer.push(rest, &mut out);
            break;
        }
    }

    for frame in &out {
        if let Frame::Line(line) = frame {
            assert!(!line.is_empty(), "empty line emitted");
            assert!(
                line.len() <= max_line,
                "line of {} > {max_line}",
                line.len()
            );
            assert!(
                find(line, terminator).is_none(),
                "line holds the terminator"
            );
            assert_ne!(line.first(), Some(&b'\r'));
            assert_ne!(line.last(), Some(&b'\r'));
        }
    }
    let (expected, tail) = model(stream, terminator, max_line);
    assert_eq!(
        out, expected,
        "max_line {max_line}, terminator {terminator:?}, cuts {cuts:?}"
    );
    let tail_overlong = tail.len() > max_line + terminator.len() - 1;
    if !tail_overlong {
        // Nothing dropped: every byte is in a frame, a terminator or the buffer.
        assert_eq!(framer.buffered(), tail.len());
    }

    framer.clear();
    assert_eq!(framer.buffered(), 0);
});
