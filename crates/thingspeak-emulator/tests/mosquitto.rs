//! The real Mosquitto command-line clients against the emulator over TLS,
//! trusting only the emulator's generated CA file (`--cafile`).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::process::Command;

fn have(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[tokio::test]
async fn mosquitto_pub_and_sub_over_tls_with_cafile() {
    if !(have("mosquitto_pub") && have("mosquitto_sub")) {
        eprintln!(
            "\n\n*** SKIPPED mosquitto_pub_and_sub_over_tls_with_cafile: mosquitto_pub/mosquitto_sub \
             not found (apt-get install mosquitto-clients) ***\n\n"
        );
        return;
    }
    let emu = emulator().await;
    let port = emu.tls_addr().unwrap().port().to_string();
    let ca = emu.ca_file().unwrap().to_str().unwrap().to_owned();

    // dev2 subscribes to channel 300's feed (current API, device credentials).
    let sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-V",
            "mqttv311",
        ])
        .args(["-i", DEV2.0, "-u", DEV2.1, "-P", DEV2.2])
        .args(["-t", "channels/300/subscribe", "-C", "1", "-W", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    emu.wait_for_counters(T, |c| c.subscriptions == 1)
        .await
        .expect("mosquitto_sub did not subscribe");

    // A legacy publisher: write key in the topic, no password.
    let publish = Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-V",
            "mqttv311",
        ])
        .args(["-i", "legacy-pub", "-t", "channels/300/publish/WKEY300"])
        .args(["-m", "field1=21.5&field2=40&status=MQTTPUBLISH"])
        .output();
    let out = tokio::time::timeout(T, publish).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = tokio::time::timeout(Duration::from_secs(12), sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let j: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(j["channel_id"], 300);
    assert_eq!(j["field1"], "21.5");
    assert_eq!(j["field2"], "40");
    assert_eq!(j["status"], "MQTTPUBLISH");
    assert_eq!(emu.entries(ch(300)).len(), 1);

    // mosquitto_pub's default CONNECT with a Will is refused with CONNACK 5.
    let refused = Command::new("mosquitto_pub")
        .args([
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            &ca,
            "-V",
            "mqttv311",
        ])
        .args([
            "-i",
            "with-will",
            "--will-topic",
            "channels/300/publish/WKEY300",
        ])
        .args([
            "--will-payload",
            "field1=0",
            "-t",
            "channels/300/publish/WKEY300",
            "-m",
            "field1=1",
        ])
        .output();
    let out = tokio::time::timeout(T, refused).await.unwrap().unwrap();
    assert!(!out.status.success());
    assert_eq!(emu.entries(ch(300)).len(), 1);
}
