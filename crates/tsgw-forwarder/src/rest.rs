//! ThingSpeak's REST calls: the bulk write, `POST /channels/<id>/bulk_update.json`,
//! and the feed read, `GET /channels/<id>/feeds.json`, over HTTPS
//! (tokio-rustls with the forwarder's trust store) with hyper's HTTP/1.1
//! client. One connection per call: bulk calls are 15 s apart at best, and a
//! read is made only for an update in doubt.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use thingspeak::read::{feeds_path, parse_answer, ReadAnswer};
use thingspeak::{BulkEntry, BulkUpdateRequest, ChannelId, FeedEntry, Feeds, ReadKey, WriteKey};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Bound on one whole call (connect, TLS, request, answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most answer bytes read (the answer is a short JSON).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How a bulk call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkResult {
    /// HTTP 202 (or another 2xx): ThingSpeak took the updates.
    Accepted,
    /// HTTP 429: too soon after the previous call.
    TooFrequent,
    /// Another HTTP status: the call will not succeed as is (bad key, too big...).
    Refused { status: u16, body: String },
    /// No answer (network, TLS, timeout): may be retried.
    Failed(String),
}

/// How a feed read ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadResult {
    /// The entries created in the asked range, oldest first.
    Entries(Vec<FeedEntry>),
    /// `-1`: the channel is private and the key is missing or wrong.
    NoAccess,
    /// No usable answer (network, TLS, timeout, another status, bad JSON).
    Failed(String),
}

#[derive(Clone)]
pub struct BulkClient {
    host: String,
    port: u16,
    tls: Option<TlsConnector>,
}

impl BulkClient {
    /// `tls` None means plain HTTP (only when configured explicitly).
    pub fn new(host: String, port: u16, tls: Option<Arc<ClientConfig>>) -> Self {
        Self {
            host,
            port,
            tls: tls.map(TlsConnector::from),
        }
    }

    /// Posts `updates` for `channel`. Never logs the key.
    pub async fn post(
        &self,
        channel: ChannelId,
        key: &WriteKey,
        updates: Vec<BulkEntry>,
    ) -> BulkResult {
        let body = BulkUpdateRequest {
            write_api_key: key.clone(),
            updates,
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => return BulkResult::Failed(format!("encoding the request: {e}")),
        };
        let call = self.call(
            "POST",
            format!("/channels/{channel}/bulk_update.json"),
            Some(body),
        );
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok((status, text))) => classify(status, text),
            Ok(Err(message)) => BulkResult::Failed(message),
            Err(_) => BulkResult::Failed(format!("no answer within {CALL_TIMEOUT:?}")),
        }
    }

    /// Reads the entries of `channel` created in `[start, end]`, with the read
    /// key when given (none for a public channel). Never logs the key.
    pub async fn read_feeds(
        &self,
        channel: ChannelId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        key: Option<&ReadKey>,
        timeout: Duration,
    ) -> ReadResult {
        let path = feeds_path(channel, &start, &end, key.map(|k| k.expose()));
        let (status, text) = match tokio::time::timeout(timeout, self.call("GET", path, None)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(message)) => return ReadResult::Failed(message),
            Err(_) => return ReadResult::Failed(format!("no answer within {timeout:?}")),
        };
        match parse_answer::<Feeds>(text.as_bytes()) {
            Ok(ReadAnswer::NoAccess) => ReadResult::NoAccess,
            Ok(ReadAnswer::Found(feeds)) if status.is_success() => ReadResult::Entries(feeds.feeds),
            Ok(ReadAnswer::Found(_)) => ReadResult::Failed(format!("HTTP {status}")),
            Err(e) => ReadResult::Failed(format!(
                "HTTP {status}, answer not a feed: {e}: {}",
                text.chars().take(200).collect::<String>()
            )),
        }
    }

    /// Reads the newest `results` entries of `channel` with their status and
    /// location (what a feed subscriber gets), oldest first. Entry ids, not
    /// times, say which ones a feed skipped: `created_at` may be anything a
    /// writer chose.
    pub async fn read_newest(
        &self,
        channel: ChannelId,
        results: usize,
        key: Option<&ReadKey>,
        timeout: Duration,
    ) -> ReadResult {
        // Built before any await: the serializer is not Send.
        let path = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if let Some(key) = key {
                query.append_pair("api_key", key.expose());
            }
            query.append_pair(
                "results",
                &results.min(thingspeak::read::MAX_RESULTS).to_string(),
            );
            query.append_pair("status", "true");
            query.append_pair("location", "true");
            format!("/channels/{channel}/feeds.json?{}", query.finish())
        };
        let (status, text) = match tokio::time::timeout(timeout, self.call("GET", path, None)).await
        {
            Ok(Ok(answer)) => answer,
            Ok(Err(message)) => return ReadResult::Failed(message),
            Err(_) => return ReadResult::Failed(format!("no answer within {timeout:?}")),
        };
        match parse_answer::<Feeds>(text.as_bytes()) {
            Ok(ReadAnswer::NoAccess) => ReadResult::NoAccess,
            Ok(ReadAnswer::Found(feeds)) if status.is_success() => ReadResult::Entries(feeds.feeds),
            Ok(ReadAnswer::Found(_)) => ReadResult::Failed(format!("HTTP {status}")),
            Err(e) => ReadResult::Failed(format!("HTTP {status}, answer not a feed: {e}")),
        }
    }

    /// One request on a fresh connection: the status and the answer's text.
    async fn call(
        &self,
        method: &str,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, String), String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("host {:?}: {e}", self.host))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {e}", self.host))?;
                self.exchange(stream, method, path, body).await
            }
            None => self.exchange(tcp, method, path, body).await,
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
        method: &str,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, String), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let host_header = if (self.tls.is_some() && self.port == 443)
            || (self.tls.is_none() && self.port == 80)
        {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::USER_AGENT, "tsgw");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| format!("building the request: {e}"))?;
        let result = match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                let text = match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                {
                    Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                    Err(e) => format!("(answer unreadable: {e})"),
                };
                Ok((status, text))
            }
            Err(e) => Err(format!("HTTP request: {e}")),
        };
        conn.abort();
        result
    }
}

fn classify(status: StatusCode, body: String) -> BulkResult {
    if status.is_success() {
        BulkResult::Accepted
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        BulkResult::TooFrequent
    } else if status.is_server_error() {
        BulkResult::Failed(format!("HTTP {status}: {body}"))
    } else {
        BulkResult::Refused {
            status: status.as_u16(),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(
            classify(StatusCode::ACCEPTED, "{}".into()),
            BulkResult::Accepted
        );
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, String::new()),
            BulkResult::TooFrequent
        );
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, "bad key".into()),
            BulkResult::Refused { status: 401, .. }
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, String::new()),
            BulkResult::Failed(_)
        ));
    }
}
