//! `mosquitto_pub -l` as a device: one message per line of its stdin.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;

/// Runs `mosquitto_pub -l` against `broker` as client `id`, publishing each
/// line of `lines` (newline-separated; empty lines are skipped by
/// mosquitto_pub) to `topic` at `qos`, and waits for it to exit: an error
/// when it fails, or when it has not finished within `timeout` (it is killed).
pub async fn mosquitto_pub_lines(
    broker: SocketAddr,
    id: &str,
    topic: &str,
    qos: u8,
    lines: &[u8],
    timeout: Duration,
) -> Result<()> {
    let mut child = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &broker.ip().to_string()])
        .args(["-p", &broker.port().to_string()])
        .args(["-i", id, "-t", topic, "-q", &qos.to_string(), "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run mosquitto_pub (is it installed?)")?;
    let mut stdin = child.stdin.take().context("stdin not piped")?;
    let run = async {
        // Feeding stdin and reading stderr together: a full stderr pipe must not stall the feed.
        let feed = async {
            stdin.write_all(lines).await?;
            // EOF: mosquitto_pub publishes what is left, then disconnects and exits.
            drop(stdin);
            Ok::<_, std::io::Error>(())
        };
        let (fed, output) = tokio::join!(feed, child.wait_with_output());
        Ok::<_, std::io::Error>((fed, output?))
    };
    let (fed, output) = match tokio::time::timeout(timeout, run).await {
        Ok(result) => result.context("mosquitto_pub")?,
        Err(_) => bail!("mosquitto_pub {id} did not finish within {timeout:?}"),
    };
    if !output.status.success() {
        bail!(
            "mosquitto_pub {id} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    fed.with_context(|| format!("feeding mosquitto_pub {id}"))?;
    Ok(())
}
