//! Scraping the gateway's HTTP endpoint without an HTTP client crate.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// A minimal HTTP/1.1 GET on loopback: (status, body), bounded by `timeout`.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    http_get_with(addr, path, &[], timeout).await
}

/// [`http_get`] with more request headers (`Authorization`, ...).
pub async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let io = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(timeout, io)
        .await
        .map_err(|_| anyhow!("GET {path} from {addr} timed out after {timeout:?}"))?
        .with_context(|| format!("GET {path} from {addr}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one sample in Prometheus text format, `name{a="b"}` exactly as printed.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// Sum of every sample of `name` whose label set contains all of `labels`
/// (each like `result="accepted"`). 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, label_part) = match key.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (key, ""),
            };
            (metric == name && labels.iter().all(|want| label_part.contains(want)))
                .then(|| value.parse::<f64>().ok())?
        })
        // An empty f64 sum is -0.0, which prints as "-0".
        .sum::<f64>()
        + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x\n\
        tsgw_readings_total{device=\"bench\",result=\"accepted\",source=\"mqtt\"} 7\n\
        tsgw_readings_total{device=\"other\",result=\"accepted\",source=\"mqtt\"} 3\n\
        tsgw_readings_total{device=\"bench\",result=\"rejected\",source=\"mqtt\"} 100\n\
        tsgw_queue_readings 42\n";

    #[test]
    fn metric_sum_adds_matching_series_only() {
        assert_eq!(
            metric_sum(TEXT, "tsgw_readings_total", &["result=\"accepted\""]),
            10.0
        );
        assert_eq!(metric_sum(TEXT, "tsgw_queue_readings", &[]), 42.0);
        assert_eq!(metric_sum(TEXT, "tsgw_queue_bytes", &[]), 0.0);
    }

    #[test]
    fn metric_value_matches_the_whole_key_only() {
        assert_eq!(
            metric_value(
                TEXT,
                r#"tsgw_readings_total{device="other",result="accepted",source="mqtt"}"#
            ),
            Some(3.0)
        );
        assert_eq!(metric_value(TEXT, "tsgw_queue_readings"), Some(42.0));
        assert_eq!(metric_value(TEXT, "tsgw_readings_total"), None);
    }
}
