//! The installer's tools: config errors in the user's words, `probe`,
//! `check-config --test` and `tail`.

use std::process::Command;

use crate::common::{config_file, run_tsgw, MINIMAL_CONFIG};

#[test]
fn a_bad_environment_value_names_the_variable_as_typed() {
    let (_dir, path) = config_file(MINIMAL_CONFIG);
    let (ok, _, stderr) = run_tsgw(
        &["check-config", "--config", &path],
        &[("TSGW_UPSTREAM__UPDATE_INTERVAL_SECS", "soon")],
    );
    assert!(!ok);
    assert!(
        stderr.contains(
            "environment variable TSGW_UPSTREAM__UPDATE_INTERVAL_SECS: \
             \"upstream.update_interval_secs\" must be a number, found string \"soon\""
        ),
        "{stderr}"
    );
}

#[test]
fn a_file_error_names_the_key_without_a_profile_and_gives_the_line() {
    let (_dir, path) = config_file(&format!("{MINIMAL_CONFIG}bogus_key = 3\n"));
    let (ok, _, stderr) = run_tsgw(&["check-config", "--config", &path], &[]);
    assert!(!ok);
    assert!(!stderr.contains("default."), "{stderr}");
    assert!(
        stderr.contains(&format!("{path}, line 7: unknown key \"queue.bogus_key\"")),
        "{stderr}"
    );
}

/// A Modbus TCP meter for the probe: unit 1 answers holding registers
/// 100..=102 with 123.456 as an f32 sent low word first (CDAB) and -200 as
/// an i16; unit 2 never answers.
#[derive(Clone)]
struct Meter;

const METER_WORDS: [u16; 3] = [0xE979, 0x42F6, 0xFF38];

impl tokio_modbus::server::Service for Meter {
    type Request = tokio_modbus::SlaveRequest<'static>;
    type Response = tokio_modbus::Response;
    type Exception = tokio_modbus::ExceptionCode;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Exception>> + Send>,
    >;

    fn call(&self, req: Self::Request) -> Self::Future {
        use tokio_modbus::{ExceptionCode, Request, Response};
        if req.slave == 2 {
            return Box::pin(std::future::pending());
        }
        Box::pin(std::future::ready(match req.request {
            Request::ReadHoldingRegisters(start, count)
                if start >= 100 && u32::from(start) + u32::from(count) <= 103 =>
            {
                let from = usize::from(start - 100);
                Ok(Response::ReadHoldingRegisters(
                    METER_WORDS[from..from + usize::from(count)].to_vec(),
                ))
            }
            _ => Err(ExceptionCode::IllegalDataAddress),
        }))
    }
}

pub(crate) async fn meter() -> std::net::SocketAddr {
    use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let on_connected =
            |stream, peer| async move { accept_tcp_connection(stream, peer, |_| Ok(Some(Meter))) };
        let _ = Server::new(listener).serve(&on_connected, |_| {}).await;
    });
    addr
}

/// Runs the binary off the async threads (the simulator runs on them).
async fn tsgw_async(args: Vec<String>) -> (bool, String, String) {
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tsgw(&args, &[])
        }),
    )
    .await
    .expect("tsgw finished in time")
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_modbus_shows_every_decoding_and_the_point_to_paste() {
    let addr = meter().await;
    let args = |extra: &[&str]| {
        ["probe", "modbus", "--tcp", &addr.to_string()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let (ok, stdout, stderr) =
        tsgw_async(args(&["--unit", "1", "--address", "100", "--count", "3"])).await;
    assert!(ok, "{stderr}");
    // The negative i16 in the register table.
    assert!(
        stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["102", "0xFF38", "65336", "-200"]),
        "{stdout}"
    );
    // The f32 decodes right in CDAB order only.
    let f32_of = |order: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["100", order])
            .and_then(|l| l.split_whitespace().nth(4))
            .unwrap_or_else(|| panic!("no {order} row in\n{stdout}"))
            .to_owned()
    };
    assert_eq!(f32_of("CDAB"), "123.456");
    assert_ne!(f32_of("ABCD"), "123.456");
    assert!(
        stdout.contains(r#"{ kind = "holding", address = 100, type = "f32", order = "CDAB", target = "field1" },   # 123.456"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("transport.tcp.address = \"{addr}\"")),
        "{stdout}"
    );

    // A unit that does not answer, and an address the device does not have.
    let (ok, _, stderr) = tsgw_async(args(&[
        "--unit",
        "2",
        "--address",
        "100",
        "--timeout-ms",
        "300",
    ]))
    .await;
    assert!(!ok);
    assert!(stderr.contains("no answer within 300ms"), "{stderr}");
    let (ok, _, stderr) = tsgw_async(args(&["--unit", "1", "--address", "500"])).await;
    assert!(!ok);
    assert!(
        stderr.contains("exception 0x02 IllegalDataAddress"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_test_polls_each_device_and_names_the_silent_one() {
    let addr = meter().await;
    let devices = format!(
        r#"
[[modbus]]
name = "meter"
unit_id = 1
channel = 1001
timeout_ms = 300
transport.tcp.address = "{addr}"
points = [
  {{ kind = "holding", address = 100, type = "f32", order = "CDAB", target = "field1" }},
  {{ kind = "holding", address = 102, type = "i16", scale = 0.1, target = "field2" }},
]

[[modbus]]
name = "silent-unit"
unit_id = 2
channel = 1001
timeout_ms = 300
retries = 0
transport.tcp.address = "{addr}"
points = [{{ kind = "holding", address = 100, type = "u16", target = "field3" }}]
"#
    );
    let (_dir, path) = config_file(&format!("{MINIMAL_CONFIG}{devices}"));
    let (ok, stdout, stderr) = tsgw_async(vec![
        "check-config".into(),
        "--config".into(),
        path.clone(),
        "--test".into(),
    ])
    .await;
    assert!(!ok, "a silent unit must fail the test:\n{stdout}");
    assert!(
        stderr.contains("device \"silent-unit\" did not answer"),
        "{stderr}"
    );
    assert!(
        stdout.contains(&format!("modbus \"meter\" (unit 1 on {addr}): answered")),
        "{stdout}"
    );
    assert!(
        stdout.contains("would queue: channel 1001 field1 = 123.456"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would queue: channel 1001 field2 = -20 "),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "modbus \"silent-unit\" (unit 2 on {addr}): DID NOT ANSWER"
        )),
        "{stdout}"
    );

    // Without the silent unit the test passes.
    let only_meter = devices
        .split("[[modbus]]\nname = \"silent-unit\"")
        .next()
        .unwrap();
    let (_dir, path) = config_file(&format!("{MINIMAL_CONFIG}{only_meter}"));
    let (ok, stdout, stderr) = tsgw_async(vec![
        "check-config".into(),
        "--config".into(),
        path,
        "--test".into(),
    ])
    .await;
    assert!(ok, "{stdout}\n{stderr}");
}

/// A `/tail` request whose connection stays open: its status and the stream.
async fn raw_tail(http: std::net::SocketAddr) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    stream
        .write_all(format!("GET /tail HTTP/1.1\r\nHost: {http}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(crate::common::WAIT, stream.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .unwrap();
    let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0);
    (status, stream)
}

/// `tsgw tail` as a child process, its output lines collected by threads.
struct Tail {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Tail {
    fn start(http: std::net::SocketAddr, extra: &[&str]) -> Tail {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tsgw"))
            .args(["tail", "--addr", &http.to_string()])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tsgw tail starts");
        let collect = |reader: Box<dyn std::io::Read + Send>| {
            let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let lines = sink.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(reader).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().unwrap().push(line);
                }
            });
            sink
        };
        let lines = collect(Box::new(child.stdout.take().unwrap()));
        let log = collect(Box::new(child.stderr.take().unwrap()));
        Tail { child, lines, log }
    }

    /// Waits for an output line (stdout, or stderr with `log`) containing `text`.
    async fn wait_for(&self, text: &str, log: bool) {
        let deadline = tokio::time::Instant::now() + crate::common::WAIT;
        let source = if log { &self.log } else { &self.lines };
        loop {
            if source.lock().unwrap().iter().any(|l| l.contains(text)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tsgw tail never printed {text:?}; stdout: {:?}; stderr: {:?}",
                self.lines.lock().unwrap(),
                self.log.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_readings_as_they_enter_the_queue() {
    use crate::common::*;
    let emulator = emulator(std::time::Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let gateway = Gateway::start(&config);
    let all = Tail::start(gateway.http, &[]);
    let only_1001 = Tail::start(gateway.http, &["--channel", "1001"]);
    // Following before anything is published: nothing published after is missed.
    all.wait_for("following readings", true).await;
    only_1001.wait_for("following readings", true).await;

    let esp = device(gateway.mqtt, "esp-kitchen").await;
    publish(&esp, "channels/1002/publish", "field4=7.5").await;
    publish(&esp, "sensors/kitchen/json", r#"{"t": 19.25}"#).await;
    all.wait_for("mqtt/drop_in channel 1002 field4 = 7.5", false)
        .await;
    all.wait_for("mqtt/json-sensor channel 1001 field1 = 19.25", false)
        .await;
    only_1001
        .wait_for("mqtt/json-sensor channel 1001 field1 = 19.25", false)
        .await;
    let filtered = only_1001.lines.lock().unwrap().clone();
    assert!(
        filtered.iter().all(|l| l.contains("channel 1001")),
        "{filtered:?}"
    );
    // Each line starts with the measured time.
    let line = all.lines.lock().unwrap()[0].clone();
    let time = line.split_whitespace().next().unwrap();
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{line}");

    // Followers are bounded: the two above plus 14 more fill the slots, the
    // next is refused, and a slot frees when its follower leaves.
    let mut held = Vec::new();
    for _ in 0..14 {
        let (status, stream) = raw_tail(gateway.http).await;
        assert_eq!(status, 200);
        held.push(stream);
    }
    assert_eq!(raw_tail(gateway.http).await.0, 503);
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    while raw_tail(gateway.http).await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a left follower's slot never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The tail ends cleanly when the gateway stops.
    let mut all = all;
    gateway.stop();
    let deadline = std::time::Instant::now() + crate::common::WAIT;
    let status = loop {
        if let Some(status) = all.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tsgw tail outlived the gateway"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    all.wait_for("the gateway closed the feed", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_serial_prints_each_line_with_what_the_parser_makes_of_it() {
    use std::io::BufRead;
    use tokio::io::AsyncWriteExt;
    use tokio_serial::SerialPort;
    let (mut device, port) = tokio_serial::SerialStream::pair().expect("pty pair");
    let path = port.name().expect("pty path");
    let mut probe = Command::new(env!("CARGO_BIN_EXE_tsgw"))
        .args(["probe", "serial", &path, "--lines", "2", "--seconds", "30"])
        .args([
            "--parser",
            r#"{ format = "key_value", fields = { t = "field1", h = "field2" } }"#,
        ])
        .env_remove("TSGW_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tsgw probe serial starts");
    let mut stderr = std::io::BufReader::new(probe.stderr.take().unwrap());
    let opened = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stderr.read_line(&mut line).map(|_| line)
    });
    let opened = tokio::time::timeout(crate::common::WAIT, opened)
        .await
        .expect("the probe opened the port in time")
        .unwrap()
        .unwrap();
    assert!(
        opened.starts_with(&format!("reading {path} at 9600 baud")),
        "{opened}"
    );
    device
        .write_all(b"t=21.5,h=40\r\nt=22,h\r\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(
        crate::common::WAIT,
        tokio::task::spawn_blocking(move || probe.wait_with_output()),
    )
    .await
    .expect("the probe stopped after two lines")
    .unwrap()
    .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "\"t=21.5,h=40\"  →  1 field1 = 21.5, 1 field2 = 40",
            "\"t=22,h\"  →  1 field1 = 22, ! bad_pair: pair \"h\" has no \"=\" separator",
        ]
    );
    drop(port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_serial_uses_the_parser_of_the_configured_port() {
    use std::io::BufRead;
    use tokio::io::AsyncWriteExt;
    use tokio_serial::SerialPort;
    let (mut device, port) = tokio_serial::SerialStream::pair().expect("pty pair");
    let path = port.name().expect("pty path");
    // The config names the device file; the probe gets a by-id style link to it.
    let (dir, config) = config_file(&format!(
        "{MINIMAL_CONFIG}\n[[serial]]\nname = \"arduino\"\npath = {path:?}\nchannel = 1002\n\
         baud = 19200\nexclusive = false\n\
         parser = {{ format = \"key_value\", fields = {{ t = \"field2\", h = \"field3\" }} }}\n"
    ));
    let link = dir.path().join("usb-Arduino_Uno_0001-if00");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let link = link.display().to_string();
    let mut probe = Command::new(env!("CARGO_BIN_EXE_tsgw"))
        .args(["probe", "serial", &link, "--lines", "1", "--seconds", "30"])
        .args(["--config", &config])
        .env_remove("TSGW_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tsgw probe serial starts");
    let mut stderr = std::io::BufReader::new(probe.stderr.take().unwrap());
    let opened = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        stderr.read_line(&mut line).map(|_| line)
    });
    let opened = tokio::time::timeout(crate::common::WAIT, opened)
        .await
        .expect("the probe opened the port in time")
        .unwrap()
        .unwrap();
    assert!(
        opened.starts_with(&format!(
            "reading {link} at 19200 baud (settings and parser of [[serial]] \"arduino\" in {config})"
        )),
        "{opened}"
    );
    device.write_all(b"t=23.5,h=61\r\n").await.unwrap();
    let out = tokio::time::timeout(
        crate::common::WAIT,
        tokio::task::spawn_blocking(move || probe.wait_with_output()),
    )
    .await
    .expect("the probe stopped after a line")
    .unwrap()
    .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        ["\"t=23.5,h=61\"  →  1002 field2 = 23.5, 1002 field3 = 61"]
    );
    drop(port);
}
