//! The status page as HTML: one self-contained document (inline style, SVG
//! plots, no script, nothing fetched), refreshed by the browser itself.
//! Every text that comes from a device or the config is escaped.

use std::fmt::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tsgw_queue::OpenPhase;

use super::plot;
use super::snapshot::{DeviceState, ErrorCount, StatusPage};

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.2em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}th,td{padding:.25em .6em;text-align:left;vertical-align:top;border-bottom:1px solid #eee}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#666;font-size:.85em}.state{font-weight:600}
.up,.receiving{color:#17803d}.down{color:#b3261e}.quiet,.unknown{color:#8a6d00}
.values span{display:inline-block;margin-right:.8em;white-space:nowrap}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}.plots figcaption{font-size:.85em;color:#444}
ul.errors{margin:0;padding-left:1em}
";

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

pub fn render(page: &StatusPage, refresh: Duration) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{}\">\
         <link rel=\"icon\" href=\"data:,\"><title>tsgw status</title><style>{STYLE}</style></head><body>",
        refresh.as_secs().max(1)
    );
    let _ = write!(
        out,
        "<h1>tsgw status</h1><p class=\"meta\">version {} · up {} · {} · refreshes every {} s</p>",
        env!("CARGO_PKG_VERSION"),
        duration(to_std(page.now - page.started)),
        time(page.now),
        refresh.as_secs().max(1)
    );
    upstream(&mut out, page);
    devices(&mut out, page);
    channels(&mut out, page);
    plots(&mut out, page);
    queue(&mut out, page);
    downlink(&mut out, page);
    out.push_str("</body></html>");
    out
}

fn to_std(d: chrono::Duration) -> Duration {
    d.to_std().unwrap_or_default()
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `12:03:04 (5 s ago)`, or `(in 5 s)` for a time ahead of `now`.
fn when(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else {
        return "—".to_owned();
    };
    let clock = t.format("%H:%M:%S");
    if t <= now {
        format!("{clock} ({} ago)", duration(to_std(now - t)))
    } else {
        format!("{clock} (in {})", duration(to_std(t - now)))
    }
}

pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn errors(out: &mut String, errors: &[ErrorCount]) {
    if errors.is_empty() {
        out.push_str("none");
        return;
    }
    out.push_str("<ul class=\"errors\">");
    for e in errors {
        let _ = write!(
            out,
            "<li>{}: {} in the last hour ({} in all)</li>",
            escape(&e.reason),
            e.last_hour,
            e.total
        );
    }
    out.push_str("</ul>");
}

fn upstream(out: &mut String, page: &StatusPage) {
    let u = &page.upstream;
    out.push_str("<h2>Upstream</h2><table id=\"upstream\"><tbody>");
    out.push_str("<tr><th>Connection</th><td>");
    if u.connections.is_empty() {
        out.push_str("not started yet");
    }
    for (name, up) in &u.connections {
        let (class, word) = if *up {
            ("up", "connected")
        } else {
            ("down", "disconnected")
        };
        let _ = write!(
            out,
            "<span class=\"state {class}\">{} {word}</span> ",
            escape(name)
        );
    }
    let _ = write!(
        out,
        "</td></tr><tr><th>Last update written</th><td>{}</td></tr><tr><th>Last disconnect</th><td>",
        when(u.last_publish, page.now)
    );
    match &u.last_disconnect {
        Some(d) => {
            let _ = write!(
                out,
                "{} ({}) at {}",
                escape(&d.reason),
                escape(&d.connection),
                when(Some(d.seen_at), page.now)
            );
        }
        None => out.push_str("none since the gateway started"),
    }
    out.push_str("</td></tr><tr><th>Disconnects</th><td>");
    errors(out, &u.disconnects);
    out.push_str("</td></tr><tr><th>Backfill</th><td>");
    if u.backfill.is_empty() {
        out.push_str("nothing to backfill");
    }
    for b in &u.backfill {
        let rate = match b.rate {
            Some(r) => format!("{r:.1} readings/s"),
            None => "rate not measured yet".to_owned(),
        };
        let eta = match (b.eta, b.rate) {
            (Some(eta), _) => format!("done in about {}", duration(eta)),
            (None, Some(_)) => "not shrinking".to_owned(),
            (None, None) => "ETA once measured".to_owned(),
        };
        let _ = write!(
            out,
            "<div>channel {}: {} in {} left, {rate}, {eta}</div>",
            escape(&b.channel),
            plural(b.readings, "reading"),
            plural(b.windows, "window")
        );
    }
    out.push_str("</td></tr></tbody></table>");
}

fn devices(out: &mut String, page: &StatusPage) {
    out.push_str(
        "<h2>Devices</h2><table id=\"devices\"><thead><tr><th>Device</th><th>Source</th><th>State</th>\
         <th>Last reading</th><th>Measured</th><th>Last values</th><th>Readings</th><th>Recent errors</th></tr></thead><tbody>",
    );
    if page.devices.is_empty() {
        out.push_str("<tr><td colspan=\"8\">no devices configured or seen yet</td></tr>");
    }
    for d in &page.devices {
        let class = match d.state {
            DeviceState::Up => "up",
            DeviceState::Down => "down",
            DeviceState::Receiving => "receiving",
            DeviceState::Quiet => "quiet",
            DeviceState::Unknown => "unknown",
        };
        let _ = write!(
            out,
            "<tr class=\"device\" data-device=\"{}\"><td class=\"name\">{}{}</td><td>{}</td><td class=\"state {class}\">{}</td><td>{}</td><td>{}</td><td class=\"values\">",
            escape(&d.name),
            escape(&d.name),
            if d.configured { "" } else { " <span class=\"meta\">(not in config)</span>" },
            d.source,
            d.state.label(),
            when(d.last_stored, page.now),
            when(d.last_measured, page.now),
        );
        if d.values.is_empty() && d.via.is_none() {
            out.push('—');
        }
        for (what, value) in &d.values {
            let _ = write!(
                out,
                "<span>{} = <b class=\"value\">{}</b></span>",
                escape(what),
                escape(value)
            );
        }
        // An account's rule readings show under the rule: say which.
        if let Some(via) = &d.via {
            let _ = write!(
                out,
                "<span class=\"via\">{} through rule <b>{}</b> to channel {}</span>",
                plural(via.readings, "reading"),
                escape(&via.rule),
                via.channel
            );
        }
        let _ = write!(
            out,
            "</td><td class=\"num\">{} accepted{}</td><td>",
            d.accepted,
            if d.rejected > 0 {
                format!(", {} rejected", d.rejected)
            } else {
                String::new()
            }
        );
        errors(out, &d.errors);
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>");
}

fn channels(out: &mut String, page: &StatusPage) {
    out.push_str(
        "<h2>Channels</h2><table id=\"channels\"><thead><tr><th>Channel</th><th>Last update sent</th>\
         <th>Last confirmed</th><th>Next window</th><th>Queued</th><th>Oldest queued reading</th>\
         <th>Backlog</th><th>Updates</th><th>Dropped</th></tr></thead><tbody>",
    );
    if page.channels.is_empty() {
        out.push_str("<tr><td colspan=\"9\">no channels configured or seen yet</td></tr>");
    }
    for c in &page.channels {
        let next = match c.next_window {
            // Past its time: waiting for the connection (or being sent now).
            Some(t) if t <= page.now => format!("due since {}", duration(to_std(page.now - t))),
            Some(t) => when(Some(t), page.now),
            None => "nothing to send".to_owned(),
        };
        let backlog = if c.backlog_windows > 0 {
            format!(
                "{} in {}",
                plural(c.backlog_readings, "reading"),
                plural(c.backlog_windows, "window")
            )
        } else {
            "none".to_owned()
        };
        let _ = write!(
            out,
            "<tr class=\"channel\" data-channel=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{next}</td><td class=\"num\">{}</td><td>{}</td><td>{backlog}</td><td class=\"num\">{} sent, {} confirmed</td><td>",
            c.channel,
            c.channel,
            when(c.last_sent, page.now),
            when(c.last_confirmed, page.now),
            c.queued.map_or("—".to_owned(), |n| n.to_string()),
            when(c.oldest_queued, page.now),
            c.sent,
            c.confirmed,
        );
        errors(out, &c.dropped);
        out.push_str("</td></tr>");
    }
    out.push_str("</tbody></table>");
}

fn plots(out: &mut String, page: &StatusPage) {
    out.push_str("<h2>Last hour</h2>");
    if page.plots.is_empty() {
        out.push_str("<p>No numbers stored in the last hour.</p>");
        return;
    }
    out.push_str("<div class=\"plots\">");
    for p in &page.plots {
        let title = format!("channel {} {}", p.channel, p.target);
        let last = p
            .buckets
            .last()
            .map(|b| tsgw_core::Value::Number(b.mean()).to_string())
            .unwrap_or_default();
        let _ = write!(
            out,
            "<figure class=\"plot\" data-channel=\"{}\" data-target=\"{}\">{}<figcaption>{} · last 30 s mean {}</figcaption></figure>",
            p.channel,
            p.target,
            plot::svg(&title, &p.buckets, page.now),
            escape(&title),
            escape(&last)
        );
    }
    out.push_str("</div>");
    if page.unplotted > 0 {
        let _ = write!(
            out,
            "<p class=\"meta\">{} numbers of further fields are not plotted (too many fields).</p>",
            page.unplotted
        );
    }
}

/// Channel feeds and downlink rules, when there are any.
fn downlink(out: &mut String, page: &StatusPage) {
    let d = &page.downlink;
    if d.feeds.is_empty() && d.rules.is_empty() {
        return;
    }
    out.push_str("<h2>From ThingSpeak</h2>");
    if !d.feeds.is_empty() {
        out.push_str(
            "<table id=\"feeds\"><thead><tr><th>Channel feed</th><th>Subscription</th>\
             <th>Entries relayed</th><th>Read after an outage</th><th>Missed</th></tr></thead><tbody>",
        );
        for f in &d.feeds {
            let (class, state) = if f.subscribed {
                ("up", "subscribed")
            } else {
                ("down", "down")
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"state {class}\">{state}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&f.channel),
                f.entries,
                f.filled,
                f.missed
            );
        }
        out.push_str("</tbody></table>");
    }
    if !d.rules.is_empty() {
        out.push_str(
            "<table id=\"downlink\"><thead><tr><th>Downlink rule</th><th>Entries</th><th>Applied</th>\
             <th>Refused</th><th>Failed</th></tr></thead><tbody>",
        );
        for r in &d.rules {
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>",
                escape(&r.rule),
                r.received,
                r.applied
            );
            errors(out, &r.refused);
            out.push_str("</td><td>");
            errors(out, &r.failed);
            out.push_str("</td></tr>");
        }
        out.push_str("</tbody></table>");
    }
}

fn queue(out: &mut String, page: &StatusPage) {
    let q = &page.queue;
    out.push_str("<h2>Queue</h2><table id=\"queue\"><tbody><tr><th>State</th><td>");
    if q.open.phase == OpenPhase::Open {
        let _ = write!(out, "open (opening took {})", duration(q.open.elapsed));
    } else {
        let _ = write!(
            out,
            "opening: {} for {}",
            q.open.phase.describe(),
            duration(q.open.elapsed),
        );
        if q.open.items > 0 {
            let _ = write!(out, ", {} readings so far", q.open.items);
        }
        if let Some(rate) = q.open.rate() {
            let _ = write!(out, ", {rate:.1} readings/s");
        }
        if let Some(left) = q.open.left() {
            let _ = write!(out, ", {left} left");
            if let Some(eta) = q.open.eta() {
                let _ = write!(out, ", done in about {}", duration(eta));
            }
        }
    }
    let fill = if q.max_bytes > 0 {
        format!(
            " ({:.1} % of {})",
            q.bytes as f64 * 100.0 / q.max_bytes as f64,
            bytes(q.max_bytes)
        )
    } else {
        String::new()
    };
    let _ = write!(
        out,
        "</td></tr><tr><th>Readings</th><td class=\"num\">{}</td></tr><tr><th>Bytes</th><td>{}{fill}</td></tr>\
         <tr><th>Oldest reading</th><td>{}</td></tr><tr><th>Disk</th><td>{} in {}{}</td></tr><tr><th>Dropped</th><td>",
        q.readings,
        bytes(q.bytes),
        q.oldest_age.map_or("—".to_owned(), |a| format!("{} old", duration(a))),
        q.disk_used.map_or("?".to_owned(), bytes),
        escape(&q.dir.display().to_string()),
        q.disk_free.map_or(String::new(), |f| format!(", {} free", bytes(f))),
    );
    errors(out, &q.drops);
    if q.quarantined > 0 {
        let _ = write!(
            out,
            "<div>stores moved aside as unreadable: {}</div>",
            q.quarantined
        );
    }
    out.push_str("</td></tr></tbody></table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::status::snapshot::{
        BackfillRow, ChannelRow, DeviceRow, QueueView, UpstreamView, Via,
    };
    use chrono::TimeZone;
    use tsgw_core::SourceKind;
    use tsgw_queue::OpenState;

    fn page(devices: Vec<DeviceRow>) -> StatusPage {
        let now = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
        StatusPage {
            now,
            started: now - chrono::Duration::seconds(65),
            devices,
            channels: Vec::new(),
            upstream: UpstreamView {
                connections: vec![("main".into(), true)],
                last_disconnect: None,
                disconnects: Vec::new(),
                last_publish: None,
                backfill: Vec::new(),
            },
            downlink: Default::default(),
            queue: QueueView {
                open: OpenState {
                    phase: OpenPhase::Counting,
                    items: 5000,
                    elapsed: Duration::from_secs(40),
                    phase_elapsed: Duration::from_secs(20),
                    expected: Some(20_000),
                },
                readings: 3,
                bytes: 2048,
                max_bytes: 4096,
                oldest_age: None,
                dir: "/var/lib/tsgw".into(),
                disk_used: Some(10_000),
                disk_free: None,
                drops: vec![ErrorCount {
                    reason: "full".into(),
                    last_hour: 1,
                    total: 2,
                }],
                quarantined: 0,
            },
            plots: Vec::new(),
            unplotted: 0,
        }
    }

    fn device(name: &str, value: &str) -> DeviceRow {
        DeviceRow {
            source: SourceKind::Mqtt,
            name: name.into(),
            configured: true,
            state: DeviceState::Receiving,
            last_stored: None,
            last_measured: None,
            values: vec![("1001 status".into(), value.into())],
            accepted: 1,
            rejected: 0,
            errors: Vec::new(),
            via: None,
        }
    }

    #[test]
    fn an_account_row_names_the_rule_it_sends_through() {
        let now = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
        let account = DeviceRow {
            values: Vec::new(),
            last_stored: Some(now - chrono::Duration::seconds(3)),
            via: Some(Via {
                rule: "green<house>".into(),
                channel: tsgw_core::ChannelId::new(1002).unwrap(),
                readings: 60,
            }),
            ..device("esp", "")
        };
        let html = render(&page(vec![account]), Duration::from_secs(10));
        let row = &html[html.find("data-device=\"esp\"").unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(row.contains(">receiving<"), "{row}");
        assert!(row.contains("(3 s ago)"), "{row}");
        assert!(
            row.contains("60 readings through rule <b>green&lt;house&gt;</b> to channel 1002"),
            "{row}"
        );
        assert!(
            row.contains("<td class=\"values\"><span class=\"via\">"),
            "an account sending through a rule has no dash for values: {row}"
        );
    }

    #[test]
    fn device_text_is_escaped() {
        let html = render(
            &page(vec![device(
                "<script>x</script>",
                "\"><img src=x onerror=alert(1)>",
            )]),
            Duration::from_secs(10),
        );
        assert!(!html.contains("<script>x"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
    }

    /// Every address the page would make a browser fetch or follow: the
    /// values of `src`, `href` (and `xlink:href`), `srcset`, `action` and
    /// `poster` attributes, and CSS `url(...)` and `@import`s.
    fn addresses(html: &str) -> Vec<String> {
        let mut found = Vec::new();
        let lower = html.to_ascii_lowercase();
        for attr in ["src", "href", "srcset", "action", "poster"] {
            let needle = format!("{attr}=");
            for (at, _) in lower.match_indices(&needle) {
                // An attribute name starts after a space or a namespace colon.
                let before = lower[..at].chars().next_back();
                if !matches!(before, Some(' ' | '\t' | '\n' | ':')) {
                    continue;
                }
                let rest = &html[at + needle.len()..];
                let value = match rest.chars().next() {
                    Some(q @ ('"' | '\'')) => rest[1..].split(q).next().unwrap_or_default(),
                    _ => rest
                        .split(|c: char| c.is_whitespace() || c == '>')
                        .next()
                        .unwrap_or_default(),
                };
                found.push(value.to_owned());
            }
        }
        for (at, _) in lower.match_indices("url(") {
            let value = html[at + 4..].split(')').next().unwrap_or_default();
            found.push(value.trim().trim_matches(['"', '\'']).to_owned());
        }
        // `@import url(...)` is found above; this is `@import "..."`.
        for (at, _) in lower.match_indices("@import") {
            let rest = html[at + 7..].trim_start();
            if let Some(q @ ('"' | '\'')) = rest.chars().next() {
                found.push(rest[1..].split(q).next().unwrap_or_default().to_owned());
            }
        }
        found
    }

    /// `data:` or a path on the gateway itself; no scheme, no `//host`.
    fn stays_on_the_gateway(address: &str) -> bool {
        if address.to_ascii_lowercase().starts_with("data:") {
            return true;
        }
        let scheme = address.split_once(':').is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        });
        // `\\host` is `//host` to a browser.
        !scheme && !address.starts_with("//") && !address.starts_with("\\\\")
    }

    #[test]
    fn the_fetch_check_sees_what_a_browser_would_fetch() {
        let bad = [
            "<img src=\"http://cdn.example/x.png\">",
            "<script src='https://cdn.example/chart.js'></script>",
            "<link rel=stylesheet href=//cdn.example/x.css>",
            "<use xlink:href=\"https://cdn.example/s.svg#a\"/>",
            "<div style=\"background:url('https://cdn.example/bg.png')\"></div>",
            "<style>@import 'https://cdn.example/x.css';</style>",
            "<img src=\"\\\\cdn.example\\x.png\">",
        ];
        for html in bad {
            let found = addresses(html);
            assert!(
                !found.is_empty() && !found.iter().all(|a| stays_on_the_gateway(a)),
                "{html}: {found:?}"
            );
        }
        let good = "<link rel=\"icon\" href=\"data:,\"><a href=\"/tail\">tail</a>\
                    <svg xmlns=\"http://www.w3.org/2000/svg\"></svg><p data-src=\"x\">";
        assert_eq!(addresses(good), ["data:,", "/tail"]);
        assert!(addresses(good).iter().all(|a| stays_on_the_gateway(a)));
    }

    #[test]
    fn the_page_refreshes_itself_and_fetches_nothing() {
        let mut p = page(vec![device("esp", "21.5")]);
        // With a plot, so the SVG (and its namespace) is in the page.
        p.plots = vec![crate::ops::status::snapshot::Plot {
            channel: tsgw_core::ChannelId::new(1001).unwrap(),
            target: tsgw_core::Target::Field(tsgw_core::Field::new(1).unwrap()),
            buckets: vec![crate::ops::status::recent::Bucket {
                start: p.now.timestamp() - 60,
                min: 1.0,
                max: 2.0,
                sum: 3.0,
                count: 2,
            }],
        }];
        let html = render(&p, Duration::from_secs(10));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"10\">"));
        assert!(!html.contains("<script"));
        assert!(html.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        let addresses = addresses(&html);
        assert!(
            addresses.iter().all(|a| stays_on_the_gateway(a)),
            "the page fetches from elsewhere: {addresses:?}"
        );
        assert!(html.contains("<b class=\"value\">21.5</b>"));
        assert!(
            html.contains("opening: counting queued readings for 40 s, 5000 readings so far"),
            "{html}"
        );
        // 5000 in the phase's 20 s: 250 a second, 15000 left, 60 s.
        assert!(
            html.contains(
                "5000 readings so far, 250.0 readings/s, 15000 left, done in about 1 min 0 s</td>"
            ),
            "{html}"
        );
        assert!(html.contains("2.0 KiB (50.0 % of 4.0 KiB)"), "{html}");
        assert!(html.contains("full: 1 in the last hour (2 in all)"));
    }

    /// The `<tr>` that starts at `marker`.
    fn row<'a>(html: &'a str, marker: &str) -> &'a str {
        let start = html
            .find(marker)
            .unwrap_or_else(|| panic!("no {marker} in\n{html}"));
        let row = &html[start..];
        &row[..row.find("</tr>").unwrap()]
    }

    #[test]
    fn channel_rows_show_times_backlog_and_the_oldest_reading() {
        let mut p = page(Vec::new());
        let now = p.now;
        let secs = chrono::Duration::seconds;
        let ch = |n| tsgw_core::ChannelId::new(n).unwrap();
        p.channels = vec![
            ChannelRow {
                channel: ch(1001),
                last_sent: Some(now - secs(12)),
                last_confirmed: Some(now - secs(75)),
                next_window: Some(now + secs(3)),
                queued: Some(250),
                oldest_queued: Some(now - secs(7200)),
                backlog_readings: 240,
                backlog_windows: 16,
                sent: 9,
                confirmed: 8,
                dropped: vec![ErrorCount {
                    reason: "rejected".into(),
                    last_hour: 1,
                    total: 3,
                }],
            },
            ChannelRow {
                channel: ch(1002),
                last_sent: None,
                last_confirmed: None,
                next_window: Some(now - secs(4)),
                queued: None,
                oldest_queued: None,
                backlog_readings: 0,
                backlog_windows: 0,
                sent: 0,
                confirmed: 0,
                dropped: Vec::new(),
            },
        ];
        let html = render(&p, Duration::from_secs(10));
        // 1_700_000_000 is 22:13:20 UTC.
        assert_eq!(
            row(&html, "<tr class=\"channel\" data-channel=\"1001\">"),
            "<tr class=\"channel\" data-channel=\"1001\"><td>1001</td>\
             <td>22:13:08 (12 s ago)</td><td>22:12:05 (1 min 15 s ago)</td>\
             <td>22:13:23 (in 3 s)</td><td class=\"num\">250</td>\
             <td>20:13:20 (2 h 0 min ago)</td><td>240 readings in 16 windows</td>\
             <td class=\"num\">9 sent, 8 confirmed</td>\
             <td><ul class=\"errors\"><li>rejected: 1 in the last hour (3 in all)</li></ul></td>"
        );
        // A window past its time waits for the connection; no queue yet is a dash.
        assert_eq!(
            row(&html, "<tr class=\"channel\" data-channel=\"1002\">"),
            "<tr class=\"channel\" data-channel=\"1002\"><td>1002</td><td>—</td><td>—</td>\
             <td>due since 4 s</td><td class=\"num\">—</td><td>—</td><td>none</td>\
             <td class=\"num\">0 sent, 0 confirmed</td><td>none</td>"
        );
    }

    #[test]
    fn backfill_rows_show_what_is_left_the_rate_and_the_eta() {
        let mut p = page(Vec::new());
        let backfill = |channel: &str, rate: Option<f64>, eta: Option<u64>| BackfillRow {
            channel: channel.into(),
            readings: 12_000,
            windows: 800,
            rate,
            eta: eta.map(Duration::from_secs),
        };
        p.upstream.backfill = vec![
            backfill("1001", Some(42.5), Some(282)),
            backfill("1002", Some(0.0), None),
            backfill("1003", None, None),
        ];
        let html = render(&p, Duration::from_secs(10));
        let cell = html
            .split("<tr><th>Backfill</th><td>")
            .nth(1)
            .and_then(|rest| rest.split("</td>").next())
            .unwrap();
        assert_eq!(
            cell,
            "<div>channel 1001: 12000 readings in 800 windows left, 42.5 readings/s, done in about 4 min 42 s</div>\
             <div>channel 1002: 12000 readings in 800 windows left, 0.0 readings/s, not shrinking</div>\
             <div>channel 1003: 12000 readings in 800 windows left, rate not measured yet, ETA once measured</div>"
        );
    }

    #[test]
    fn units_read_naturally() {
        assert_eq!(duration(Duration::from_secs(5)), "5 s");
        assert_eq!(duration(Duration::from_secs(125)), "2 min 5 s");
        assert_eq!(duration(Duration::from_secs(7300)), "2 h 1 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
