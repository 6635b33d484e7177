//! ThingSpeak's REST bulk-write call, `POST /channels/<id>/bulk_update.json`,
//! over HTTPS (tokio-rustls with the forwarder's trust store) with hyper's
//! HTTP/1.1 client. One connection per call: calls are 15 s apart at best.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use thingspeak::{BulkEntry, BulkUpdateRequest, ChannelId, WriteKey};
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
        match tokio::time::timeout(CALL_TIMEOUT, self.call(channel, body)).await {
            Ok(result) => result,
            Err(_) => BulkResult::Failed(format!("no answer within {CALL_TIMEOUT:?}")),
        }
    }

    async fn call(&self, channel: ChannelId, body: Vec<u8>) -> BulkResult {
        let tcp = match TcpStream::connect((self.host.as_str(), self.port)).await {
            Ok(s) => s,
            Err(e) => {
                return BulkResult::Failed(format!("connect {}:{}: {e}", self.host, self.port))
            }
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(tls) => {
                let name = match ServerName::try_from(self.host.clone()) {
                    Ok(n) => n,
                    Err(e) => return BulkResult::Failed(format!("host {:?}: {e}", self.host)),
                };
                match tls.connect(name, tcp).await {
                    Ok(stream) => self.exchange(stream, channel, body).await,
                    Err(e) => BulkResult::Failed(format!("TLS with {}: {e}", self.host)),
                }
            }
            None => self.exchange(tcp, channel, body).await,
        }
    }

    async fn exchange<S>(&self, stream: S, channel: ChannelId, body: Vec<u8>) -> BulkResult
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => return BulkResult::Failed(format!("HTTP handshake: {e}")),
            };
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
        let request = Request::post(format!("/channels/{channel}/bulk_update.json"))
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "tsgw")
            .body(Full::new(Bytes::from(body)));
        let request = match request {
            Ok(r) => r,
            Err(e) => return BulkResult::Failed(format!("building the request: {e}")),
        };
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
                classify(status, text)
            }
            Err(e) => BulkResult::Failed(format!("HTTP request: {e}")),
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
