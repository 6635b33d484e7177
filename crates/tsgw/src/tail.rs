//! `tsgw tail`: follows readings as they enter the queue, like
//! `mosquitto_sub -v` for the pipeline. It reads the running gateway's
//! `/tail` feed over its HTTP listener (see `ops::status::tail`), so it needs
//! no access to the queue's files and works from another machine too.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::GatewayConfig;
use crate::ops::status::auth::basic_header;
use crate::ops::status::tail::{TailLine, KEEPALIVE};

/// The environment variable `tsgw tail --user` reads the password from.
pub const PASSWORD_ENV: &str = "TSGW_HTTP_PASSWORD";

/// Longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct TailArgs {
    pub config: PathBuf,
    pub addr: Option<String>,
    pub user: Option<String>,
    pub channel: Option<u64>,
    pub device: Option<String>,
    pub json: bool,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let addr = match &args.addr {
        Some(addr) => addr.clone(),
        None => {
            let config = GatewayConfig::load(&args.config).with_context(|| {
                format!(
                    "cannot learn http.listen from {} (give the address with --addr HOST:PORT)",
                    args.config.display()
                )
            })?;
            reachable(config.http.listen).to_string()
        }
    };
    let authorization = match &args.user {
        Some(user) => Some(basic_header(user, &password(user)?)),
        None => None,
    };
    let path = feed_path(args.channel, args.device.as_deref());
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .with_context(|| format!("no answer from {addr} within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| {
            format!("cannot connect to the gateway at {addr} (is it running? http.listen)")
        })?;
    let mut body = open_feed(stream, &addr, &path, authorization.as_deref()).await?;
    eprintln!("following readings as they enter the queue at http://{addr}{path} (Ctrl-C stops)");
    let stdout = std::io::stdout();
    // Two missed keepalives: the gateway or the network is gone.
    let silence = KEEPALIVE * 2 + Duration::from_secs(5);
    loop {
        let line = tokio::time::timeout(silence, body.next_line())
            .await
            .with_context(|| {
                format!("nothing from the gateway for {silence:?}; the connection is dead")
            })??;
        let Some(line) = line else {
            eprintln!("the gateway closed the feed (stopped or restarting)");
            return Ok(());
        };
        if line.trim().is_empty() {
            continue;
        }
        let text = if args.json { line } else { format_line(&line) };
        // A closed pipe (`tsgw tail | head`) ends the command.
        let mut out = stdout.lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

/// A listen address to connect to: a wildcard bind is reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

fn password(user: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        return Ok(password);
    }
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("Password for {user} (input is shown; set {PASSWORD_ENV} or pipe it in to keep it off the screen):");
    }
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\r', '\n']).to_owned();
    anyhow::ensure!(
        !password.is_empty(),
        "no password given for {user} (set {PASSWORD_ENV} or type it)"
    );
    Ok(password)
}

fn feed_path(channel: Option<u64>, device: Option<&str>) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(channel) = channel {
        query.append_pair("channel", &channel.to_string());
    }
    if let Some(device) = device {
        query.append_pair("device", device);
    }
    let query = query.finish();
    if query.is_empty() {
        "/tail".to_owned()
    } else {
        format!("/tail?{query}")
    }
}

/// `2025-05-01T12:00:00.123Z mqtt/esp channel 1001 field1 = 21.5`
pub fn format_line(json: &str) -> String {
    if let Ok(line) = serde_json::from_str::<TailLine>(json) {
        return format!(
            "{} {}/{} channel {} {} = {}",
            line.measured_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            line.source,
            line.device,
            line.channel,
            line.target,
            line.value
        );
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(json) {
        if let Some(missed) = map.get("lagged_batches") {
            return format!("# fell behind: {missed} batches of readings were not shown");
        }
    }
    format!("# {json}")
}

/// The body of a streamed response, line by line.
struct Feed {
    reader: BufReader<TcpStream>,
    chunked: bool,
    /// Bytes left in the current chunk.
    left: usize,
    pending: Vec<u8>,
    done: bool,
}

/// Sends the request and reads the response head; errors say what to fix.
async fn open_feed(
    stream: TcpStream,
    addr: &str,
    path: &str,
    authorization: Option<&str>,
) -> anyhow::Result<Feed> {
    let mut reader = BufReader::new(stream);
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/x-ndjson\r\n");
    if let Some(value) = authorization {
        request.push_str(&format!("Authorization: {value}\r\n"));
    }
    request.push_str("Connection: close\r\n\r\n");
    reader.get_mut().write_all(request.as_bytes()).await?;

    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(CONNECT_TIMEOUT, reader.read_until(b'\n', &mut head))
            .await
            .context("the gateway did not answer the tail request in time")??;
        if n == 0 {
            bail!("the gateway closed the connection before answering");
        }
        if head.len() > MAX_HEAD {
            bail!(
                "the answer's head is over {MAX_HEAD} bytes; is {addr} the gateway's http.listen?"
            );
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr} did not answer in HTTP"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    match status {
        200 => Ok(Feed {
            reader,
            chunked,
            left: 0,
            pending: Vec::new(),
            done: false,
        }),
        401 => bail!(
            "the gateway wants a user from http.users: give --user NAME and the password in {PASSWORD_ENV} (or on standard input)"
        ),
        404 => bail!("{addr} has no /tail feed: is it a tsgw gateway of this version?"),
        other => bail!("the gateway answered HTTP {other} to {path}"),
    }
}

impl Feed {
    /// The next line of the body, without its newline; `None` at its end.
    async fn next_line(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            if self.done {
                return Ok(None);
            }
            self.fill().await?;
        }
    }

    /// Reads more of the body into `pending`, undoing chunked encoding.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if !self.chunked {
            let mut buf = [0u8; 4096];
            let n = self.reader.read(&mut buf).await?;
            if n == 0 {
                self.done = true;
            }
            self.pending.extend_from_slice(&buf[..n]);
            return Ok(());
        }
        if self.left == 0 {
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line).await? == 0 {
                self.done = true;
                return Ok(());
            }
            let size = size_line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16)
                .with_context(|| format!("bad chunk size {size:?} in the feed"))?;
            if self.left == 0 {
                self.done = true;
                return Ok(());
            }
        }
        let mut buf = vec![0u8; self.left.min(64 * 1024)];
        let n = self.reader.read(&mut buf).await?;
        if n == 0 {
            self.done = true;
            return Ok(());
        }
        self.pending.extend_from_slice(&buf[..n]);
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.reader.read_exact(&mut crlf).await?;
        }
        // A line never spans more than a feed's worth of memory.
        anyhow::ensure!(
            self.pending.len() <= 1 << 20,
            "a line of the feed is over 1 MiB"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_like_mosquitto_sub() {
        let json = r#"{"measured_at":"2025-05-01T12:00:00.123Z","source":"mqtt","device":"esp","channel":1001,"target":"field1","value":21.5}"#;
        assert_eq!(
            format_line(json),
            "2025-05-01T12:00:00.123Z mqtt/esp channel 1001 field1 = 21.5"
        );
        assert_eq!(
            format_line(r#"{"lagged_batches":3}"#),
            "# fell behind: 3 batches of readings were not shown"
        );
    }

    #[test]
    fn filters_go_in_the_query() {
        assert_eq!(feed_path(None, None), "/tail");
        assert_eq!(
            feed_path(Some(7), Some("a b")),
            "/tail?channel=7&device=a+b"
        );
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        assert_eq!(
            reachable("0.0.0.0:9184".parse().unwrap()),
            "127.0.0.1:9184".parse().unwrap()
        );
        assert_eq!(
            reachable("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_across_chunk_boundaries() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab\ncd\r\n3\r\ne\n\n\r\n0\r\n\r\n")
                .await
                .unwrap();
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut feed = open_feed(stream, &addr.to_string(), "/tail", None)
            .await
            .unwrap();
        let mut lines = Vec::new();
        while let Some(line) = feed.next_line().await.unwrap() {
            lines.push(line);
        }
        assert_eq!(lines, vec!["ab", "cde", ""]);
    }
}
