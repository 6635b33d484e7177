//! A small server-side SVG plot of one channel field's last hour: the mean
//! of each bucket as a line, its min..max as a band, the range as labels.
//! No script and nothing fetched: it renders offline, in any browser.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use super::page::escape;
use super::recent::{Bucket, BUCKET_SECS, HISTORY_SECS};

const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 96.0;
/// Room for the value labels on the left and the time labels below.
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 14.0;
const TOP: f64 = 6.0;

/// The plot of `buckets` (oldest first) over the hour before `now`.
pub fn svg(title: &str, buckets: &[Bucket], now: DateTime<Utc>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"><title>{}</title><rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="#fafafa" stroke="#ccc"/>"##,
        escape(title),
        WIDTH - LEFT - 1.0,
        HEIGHT - TOP - BOTTOM,
    );
    let _ = write!(
        out,
        r##"<text x="{LEFT}" y="{}" font-size="9" fill="#666">−60 min</text><text x="{}" y="{}" font-size="9" fill="#666" text-anchor="end">now</text>"##,
        HEIGHT - 3.0,
        WIDTH - 2.0,
        HEIGHT - 3.0,
    );
    if buckets.is_empty() {
        out.push_str("</svg>");
        return out;
    }
    let (lo, hi) = range(buckets);
    let end = now.timestamp() as f64;
    let start = end - HISTORY_SECS as f64;
    let x = |t: i64| {
        let mid = t as f64 + BUCKET_SECS as f64 / 2.0;
        LEFT + (mid - start).clamp(0.0, HISTORY_SECS as f64) / HISTORY_SECS as f64
            * (WIDTH - LEFT - 1.0)
    };
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (HEIGHT - TOP - BOTTOM);
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" font-size="9" fill="#666" text-anchor="end">{}</text><text x="{}" y="{}" font-size="9" fill="#666" text-anchor="end">{}</text>"##,
        LEFT - 3.0,
        TOP + 8.0,
        escape(&short(hi)),
        LEFT - 3.0,
        HEIGHT - BOTTOM,
        escape(&short(lo)),
    );
    if buckets.iter().any(|b| b.max > b.min) {
        let upper = buckets.iter().map(|b| point(x(b.start), y(b.max)));
        let lower = buckets.iter().rev().map(|b| point(x(b.start), y(b.min)));
        let points: Vec<String> = upper.chain(lower).collect();
        let _ = write!(
            out,
            r##"<polygon points="{}" fill="#cfe3f7" stroke="none"/>"##,
            points.join(" ")
        );
    }
    if buckets.len() == 1 {
        let b = buckets[0];
        let _ = write!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="#1f6fb2"/>"##,
            x(b.start),
            y(b.mean())
        );
    } else {
        let points: Vec<String> = buckets
            .iter()
            .map(|b| point(x(b.start), y(b.mean())))
            .collect();
        let _ = write!(
            out,
            r##"<polyline points="{}" fill="none" stroke="#1f6fb2" stroke-width="1.5"/>"##,
            points.join(" ")
        );
    }
    out.push_str("</svg>");
    out
}

fn point(x: f64, y: f64) -> String {
    format!("{x:.1},{y:.1}")
}

/// The value range drawn: the buckets' extremes, widened when flat so the
/// line sits mid-height.
fn range(buckets: &[Bucket]) -> (f64, f64) {
    let lo = buckets.iter().map(|b| b.min).fold(f64::INFINITY, f64::min);
    let hi = buckets
        .iter()
        .map(|b| b.max)
        .fold(f64::NEG_INFINITY, f64::max);
    if hi > lo {
        (lo, hi)
    } else {
        let pad = (lo.abs() * 0.05).max(1.0);
        (lo - pad, hi + pad)
    }
}

/// A value label short enough for the margin: four significant digits.
fn short(v: f64) -> String {
    let magnitude = v.abs();
    if magnitude != 0.0 && !(1e-3..1e6).contains(&magnitude) {
        return format!("{v:.2e}");
    }
    let digits = if magnitude == 0.0 {
        0
    } else {
        (3 - magnitude.log10().floor() as i32).clamp(0, 6) as usize
    };
    let text = format!("{v:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn bucket(start: i64, min: f64, max: f64) -> Bucket {
        Bucket {
            start,
            min,
            max,
            sum: min + max,
            count: 2,
        }
    }

    #[test]
    fn labels_keep_four_significant_digits() {
        assert_eq!(short(123.456001282), "123.5");
        assert_eq!(short(24.675), "24.68");
        assert_eq!(short(-20.0), "-20");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(0.012345), "0.01235");
        assert_eq!(short(12_345_678.0), "1.23e7");
    }

    #[test]
    fn an_empty_plot_is_a_frame() {
        let svg = svg("1 field1", &[], Utc::now());
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(!svg.contains("polyline"));
    }

    #[test]
    fn lines_and_bands_stay_inside_the_frame() {
        let now = Utc.timestamp_opt(1_700_003_600, 0).unwrap();
        let t0 = now.timestamp() - 3600;
        let buckets = [
            bucket(t0, 1.0, 3.0),
            bucket(t0 + 1800, -5.0, 10.0),
            bucket(now.timestamp() - 30, 2.0, 2.0),
        ];
        let svg = svg("7 field1 <x>", &buckets, now);
        assert!(svg.contains("<title>7 field1 &lt;x&gt;</title>"), "{svg}");
        assert!(svg.contains("<polyline") && svg.contains("<polygon"));
        // Every coordinate pair lies within the plotting area.
        let points = svg.split("points=\"").skip(1).flat_map(|s| {
            s.split('"')
                .next()
                .unwrap()
                .split(' ')
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse::<f64>().unwrap(), y.parse::<f64>().unwrap())
                })
                .collect::<Vec<_>>()
        });
        for (x, y) in points {
            assert!((LEFT..=WIDTH).contains(&x), "x {x}");
            assert!((TOP..=HEIGHT - BOTTOM).contains(&y), "y {y}");
        }
        assert!(svg.contains(">10<") && svg.contains(">-5<"), "{svg}");
    }

    #[test]
    fn a_single_flat_bucket_is_a_dot_mid_height() {
        let now = Utc.timestamp_opt(1_700_003_600, 0).unwrap();
        let svg = svg("x", &[bucket(now.timestamp() - 60, 4.0, 4.0)], now);
        assert!(svg.contains("<circle"), "{svg}");
        let mid = TOP + (HEIGHT - TOP - BOTTOM) / 2.0;
        assert!(svg.contains(&format!("cy=\"{mid:.1}\"")), "{svg}");
    }
}
