//! The status page in a real browser: headless Chromium (Debian's
//! `chromium`, installed by `.ci/run`) loads `/` from a gateway with MQTT,
//! serial and Modbus devices. The DOM must show the devices and their
//! values (an MQTT account that publishes through a mapping rule as
//! receiving), a channel's confirmed update and queued readings, the browser must log no console message, and its screenshot must
//! not be blank. Then `http.users` (applied by SIGHUP) puts the page behind a
//! password.
//!
//! `UPDATE_STATUS_SCREENSHOT=1` copies the screenshot to docs/status-page.png
//! (the README's picture).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_serial::{SerialPort, SerialStream};

use crate::common::*;

/// Where Debian puts Chromium; `CHROMIUM` overrides (not `TSGW_...`: the
/// gateway would take that for a config key).
fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: install Chromium (apt-get install chromium; .ci/run does) or set CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless Chromium with a fresh profile on `url`; returns stdout and
/// the browser's log (stderr).
fn browse(url: &str, extra: &[&str]) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish with {url} in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Console messages in Chromium's log (`...:INFO:CONSOLE:1] "Uncaught ..."`).
fn console_messages(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

/// The share of pixels that are not the page's white background, and the
/// number of distinct colours.
fn ink(png_path: &Path) -> (f64, usize) {
    let decoder = png::Decoder::new(std::fs::File::open(png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let mut inked = 0usize;
    let mut colours = std::collections::HashSet::new();
    let total = pixels.len() / channels;
    for px in pixels.chunks(channels) {
        let rgb = [px[0], px[1.min(channels - 1)], px[2.min(channels - 1)]];
        if rgb != [255, 255, 255] {
            inked += 1;
        }
        if colours.len() < 10_000 {
            colours.insert(rgb);
        }
    }
    (inked as f64 / total as f64, colours.len())
}

async fn page_until(gateway: &Gateway, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = gateway.get("/").await;
        if status == 200 && cond(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the status page never showed {what}; last page ({status}):\n{body}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `<tr>` of one device in the page or DOM.
fn device_row<'a>(html: &'a str, device: &str) -> &'a str {
    let start = html
        .find(&format!("data-device=\"{device}\""))
        .unwrap_or_else(|| panic!("no row for device {device:?} in\n{html}"));
    let end = html[start..]
        .find("</tr>")
        .map_or(html.len(), |e| start + e);
    &html[start..end]
}

/// The text of each cell of one channel's `<tr>` (tags removed).
fn channel_cells(html: &str, channel: u64) -> Vec<String> {
    let start = html
        .find(&format!("<tr class=\"channel\" data-channel=\"{channel}\""))
        .unwrap_or_else(|| panic!("no row for channel {channel} in\n{html}"));
    let row = &html[start..];
    let row = &row[..row.find("</tr>").unwrap_or(row.len())];
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let cell = cell.split_once('>').map_or("", |(_, rest)| rest);
            let cell = cell.split("</td>").next().unwrap_or_default();
            let mut text = String::new();
            let mut in_tag = false;
            for c in cell.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            text
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_every_device_in_a_real_browser() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let meter = crate::field_tools::meter().await;
    let (mut arduino, slave) = SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty path");
    let devices = format!(
        r#"
[[serial]]
name = "arduino"
path = {path:?}
channel = 1002
exclusive = false
parser = {{ format = "key_value", fields = {{ t = "field2", h = "field3" }} }}

[[modbus]]
name = "meter"
unit_id = 1
channel = 1003
poll_interval_ms = 500
timeout_ms = 300
transport.tcp.address = "{meter}"
points = [
  {{ kind = "holding", address = 100, type = "f32", order = "CDAB", target = "field1" }},
  {{ kind = "holding", address = 102, type = "i16", scale = 0.1, target = "field2" }},
]

[[mqtt.rules]]
name = "greenhouse"
topic = "greenhouse/temperature"
channel = 1002
parser = {{ format = "json", fields = {{ "/v" = "field1" }}, time_pointer = "/ts" }}

[mqtt.users]
greenhouse-esp = "greenhouse-password"
"#
    );
    let config = write_config(
        dir.path(),
        &config_toml(&emulator, dir.path(), 1.0, &devices),
    );
    // With an account configured, the other test devices (anonymous) need this.
    let gateway = Gateway::start_with_env(&config, &[("TSGW_MQTT__ALLOW_ANONYMOUS", "true")]);

    // A sensor whose last hour of readings makes a plot, with their own times.
    // It logs in as an account: its readings are the rule's ("greenhouse").
    let sensor = device_as(
        gateway.mqtt,
        "greenhouse-sensor",
        "greenhouse-esp",
        "greenhouse-password",
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    for minute in (0..60).rev() {
        let value = 20.0 + 4.0 * (f64::from(minute) / 9.0).sin();
        publish(
            &sensor,
            "greenhouse/temperature",
            format!(
                r#"{{"v": {value:.2}, "ts": {}}}"#,
                now - i64::from(minute) * 60
            ),
        )
        .await;
    }
    let esp = device(gateway.mqtt, "esp-kitchen").await;
    publish(&esp, "channels/1001/publish", "field1=21.5&field2=40").await;
    publish(&esp, "sensors/kitchen/json", r#"{"t": 19.25, "h": 55}"#).await;
    let arduino_writer = tokio::spawn(async move {
        loop {
            if arduino.write_all(b"t=23.5,h=61\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    let page = page_until(&gateway, "every device's last values", |p| {
        p.contains("<b class=\"value\">23.5</b>")
            && p.contains("<b class=\"value\">-20</b>")
            && p.contains("<b class=\"value\">19.25</b>")
            && p.contains("<b class=\"value\">21.5</b>")
            && p.contains("data-device=\"greenhouse\"")
            && p.contains("60 readings through rule")
    })
    .await;
    // ThingSpeak (the emulator) confirms the meter's channel.
    page_until(&gateway, "a confirmed update of channel 1003", |p| {
        p.contains("data-channel=\"1003\"") && channel_cells(p, 1003)[2] != "—"
    })
    .await;
    // The upstream password of the config never shows.
    let config_text = std::fs::read_to_string(&config).unwrap();
    let secret = config_text
        .lines()
        .find_map(|l| l.trim().strip_prefix("password = \""))
        .and_then(|rest| rest.split('"').next())
        .expect("the config has an upstream password");
    assert!(!page.contains(secret), "the page shows a secret");

    // The browser's view of it.
    let url = format!("http://{}/", gateway.http);
    let (dom, log) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || browse(&url, &["--dump-dom"])
    })
    .await
    .unwrap();
    let row = device_row(&dom, "meter");
    assert!(row.contains(">up<"), "{row}");
    assert!(
        row.contains("1003 field1 = <b class=\"value\">123.456"),
        "{row}"
    );
    assert!(
        row.contains("1003 field2 = <b class=\"value\">-20</b>"),
        "{row}"
    );
    let row = device_row(&dom, "arduino");
    assert!(
        row.contains("1002 field2 = <b class=\"value\">23.5</b>"),
        "{row}"
    );
    assert!(
        row.contains("1002 field3 = <b class=\"value\">61</b>"),
        "{row}"
    );
    let row = device_row(&dom, "json-sensor");
    assert!(
        row.contains("1001 field1 = <b class=\"value\">19.25</b>"),
        "{row}"
    );
    assert!(
        row.contains("1001 field2 = <b class=\"value\">55</b>"),
        "{row}"
    );
    // The account that publishes through the rule is receiving, not "no
    // readings yet", and names the rule and channel its readings went to.
    let row = device_row(&dom, "greenhouse-esp");
    assert!(row.contains(">receiving<"), "{row}");
    assert!(!row.contains("no readings yet"), "{row}");
    assert!(
        row.contains("60 readings through rule <b>greenhouse</b> to channel 1002"),
        "{row}"
    );
    // Channel 1003 (the meter's): columns Channel, Last update sent, Last
    // confirmed, Next window, Queued, ...
    let cells = channel_cells(&dom, 1003);
    let is_clock = |text: &str| {
        let (clock, ago) = text.split_once(' ').unwrap_or_default();
        clock.len() == 8
            && clock
                .split(':')
                .all(|n| n.len() == 2 && n.parse::<u8>().is_ok())
            && ago.starts_with('(')
            && ago.ends_with(" ago)")
    };
    assert!(is_clock(&cells[1]), "last sent: {cells:?}");
    assert!(is_clock(&cells[2]), "last confirmed: {cells:?}");
    assert!(cells[4].parse::<u64>().is_ok(), "queued: {cells:?}");
    // Drop-in publishes without an account are the device "drop_in".
    let row = device_row(&dom, "drop_in");
    assert!(
        row.contains("1001 field1 = <b class=\"value\">21.5</b>"),
        "{row}"
    );
    // The hour of greenhouse readings is plotted as a line.
    let plot_start = dom
        .find("data-channel=\"1002\" data-target=\"field1\"")
        .unwrap_or_else(|| panic!("no plot of 1002 field1 in\n{dom}"));
    let plot = &dom[plot_start..];
    let plot = &plot[..plot.find("</figure>").unwrap()];
    let points = plot
        .split("<polyline points=\"")
        .nth(1)
        .and_then(|p| p.split('"').next())
        .unwrap_or_else(|| panic!("no line in the plot:\n{plot}"));
    assert!(points.split(' ').count() >= 55, "{points}");
    for table in ["upstream", "devices", "channels", "queue"] {
        assert!(dom.contains(&format!("id=\"{table}\"")), "no {table} table");
    }
    assert!(
        console_messages(&log).is_empty(),
        "console messages:\n{}",
        console_messages(&log).join("\n")
    );

    // The console check sees a broken page (it can fail).
    let (_, bad_log) = tokio::task::spawn_blocking(|| {
        browse(
            "data:text/html,<script>thisFunctionDoesNotExist()</script>",
            &["--dump-dom"],
        )
    })
    .await
    .unwrap();
    assert_eq!(console_messages(&bad_log).len(), 1, "{bad_log}");

    // A screenshot that shows something.
    let shot = dir.path().join("status-page.png");
    let (_, log) = tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || {
            browse(
                &url,
                &[
                    &format!("--screenshot={}", shot.display()),
                    "--window-size=1280,1500",
                    "--hide-scrollbars",
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(shot.exists(), "no screenshot; chromium said:\n{log}");
    let (share, colours) = ink(&shot);
    assert!(
        share > 0.02 && colours > 20,
        "the screenshot looks blank: {:.2} % of pixels inked, {colours} colours",
        share * 100.0
    );
    if std::env::var_os("UPDATE_STATUS_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/status-page.png");
        std::fs::copy(&shot, &docs).unwrap();
    }

    // An upstream connection cut shows with its reason (the page samples
    // the counters every 10 s).
    emulator.drop_all_connections();
    let last_disconnect = |page: &str| {
        page.split("<th>Last disconnect</th><td>")
            .nth(1)
            .and_then(|rest| rest.split("</td>").next())
            .unwrap_or_default()
            .to_owned()
    };
    let page = page_until(&gateway, "the last disconnect", |p| {
        !last_disconnect(p).starts_with("none")
    })
    .await;
    let cell = last_disconnect(&page);
    // "<reason> (<connection>) at <time>", the reason one that was counted.
    let (reason, rest) = cell.split_once(" (").unwrap_or_else(|| panic!("{cell}"));
    assert!(rest.starts_with("127.0.0.1:"), "{cell}");
    let disconnects = gateway
        .metric_family("tsgw_upstream_disconnects_total")
        .await;
    assert!(
        disconnects.contains(&format!("reason=\"{reason}\"")),
        "{cell} vs {disconnects}"
    );

    // http.users, applied by SIGHUP: the page and the feed want a password,
    // /metrics and the health checks do not.
    let hash = {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsgw"))
            .args(["passwd", "ops"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"open-sesame\n").unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let with_users = format!(
        "{}\n[http.users]\n{hash}",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, with_users).unwrap();
    gateway.signal("HUP");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = gateway.get("/").await;
        if status == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "http.users not applied by SIGHUP ({status}):\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gateway.get("/tail").await.0, 401);
    assert_eq!(gateway.get("/metrics").await.0, 200);
    let authorized = |password: &str| {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("ops:{password}"));
        format!("Basic {encoded}")
    };
    let (status, body) = gateway
        .get_with("/", &[("Authorization", &authorized("open-sesame"))])
        .await;
    assert_eq!(status, 200);
    assert!(body.contains("data-device=\"meter\""));
    let (status, _) = gateway
        .get_with("/", &[("Authorization", &authorized("guess"))])
        .await;
    assert_eq!(status, 401);
    assert_eq!(
        gateway
            .metric(r#"tsgw_http_denied_total{reason="bad_password"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric(r#"tsgw_http_denied_total{reason="no_credentials"}"#)
            .await,
        2.0
    );
    arduino_writer.abort();
    drop(slave);
}
