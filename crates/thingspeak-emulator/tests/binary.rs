//! The `thingspeak-emulator` binary: flags, the stdout ready line, logs, SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const T: Duration = Duration::from_secs(10);
const BIN: &str = env!("CARGO_BIN_EXE_thingspeak-emulator");

#[tokio::test]
async fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().await.unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--channels",
        "--mqtt",
        "--mqtts",
        "--ws",
        "--wss",
        "--http",
        "--https",
        "--idle-timeout",
        "--interval",
        "--bulk-interval",
        "--max-bulk-updates",
        "--handshake-timeout",
        "--cert",
        "--key",
        "--ca-out",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test]
async fn serves_the_channels_file_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let channels = dir.path().join("channels.toml");
    std::fs::write(
        &channels,
        "[[channels]]\nid = 42\nwrite_key = \"WK42\"\nread_key = \"RK42\"\n",
    )
    .unwrap();
    let ca = dir.path().join("ca.pem");
    let mut child = Command::new(BIN)
        .args(["--channels", channels.to_str().unwrap()])
        .args([
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .args(["--interval", "0", "--ca-out", ca.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(T, stdout.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert!(ready["wss"].is_null());
    assert_eq!(ready["ca_file"], ca.to_str().unwrap());
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));

    // A legacy publish over plain MQTT, by hand: CONNECT, PUBLISH, DISCONNECT.
    let mqtt: std::net::SocketAddr = ready["mqtt"].as_str().unwrap().parse().unwrap();
    let mut s = tokio::net::TcpStream::connect(mqtt).await.unwrap();
    let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0];
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let topic = b"channels/42/publish/WK42";
    let payload = b"field1=7";
    let mut publish = vec![
        0x30,
        (2 + topic.len() + payload.len()) as u8,
        0,
        topic.len() as u8,
    ];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(payload);
    publish.extend_from_slice(&[0xE0, 0]);
    s.write_all(&publish).await.unwrap();

    // The entry shows in the inspection API.
    let http: std::net::SocketAddr = ready["http"].as_str().unwrap().parse().unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let mut h = tokio::net::TcpStream::connect(http).await.unwrap();
        h.write_all(
            b"GET /api/channels/42/entries HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(T, h.read_to_string(&mut resp))
            .await
            .unwrap()
            .unwrap();
        if resp.contains("\"field1\":\"7\"") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "entry never appeared: {resp}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    for expected in [
        "MQTT listening",
        "connection accepted",
        "session open",
        "connection closed",
    ] {
        assert!(
            logs.contains(expected),
            "stderr lacks {expected:?}:\n{logs}"
        );
    }
    assert!(
        !logs.contains("WK42"),
        "a write key reached the log:\n{logs}"
    );
}
