//! One byte pipe for MQTT, whatever carries it: TCP, TLS, WebSocket or WebSocket over TLS.

use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A TCP or TLS stream, boxed so every transport has one type.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type BoxedIo = Box<dyn Io>;

pub(crate) enum Transport {
    Stream(BoxedIo),
    WebSocket(Box<WebSocketStream<BoxedIo>>),
}

impl Transport {
    /// Appends the next bytes from the peer to `buf`. `Ok(false)` is an orderly close.
    /// Cancel-safe: nothing is lost if the future is dropped before it completes.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<bool> {
        match self {
            Transport::Stream(s) => {
                buf.reserve(4096);
                Ok(s.read_buf(buf).await? > 0)
            }
            Transport::WebSocket(ws) => loop {
                match ws.next().await {
                    None => return Ok(false),
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    Some(Ok(Message::Binary(data))) => {
                        buf.extend_from_slice(&data);
                        return Ok(true);
                    }
                    Some(Ok(Message::Close(_))) => return Ok(false),
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text WebSocket frame (MQTT needs binary frames)",
                        ))
                    }
                    // Pings are answered by tungstenite itself.
                    Some(Ok(_)) => continue,
                }
            },
        }
    }

    pub async fn write_all(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            Transport::Stream(s) => {
                s.write_all(&data).await?;
                s.flush().await
            }
            Transport::WebSocket(ws) => ws
                .send(Message::Binary(data))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Ends the connection; errors are irrelevant at this point.
    pub async fn close(&mut self) {
        match self {
            Transport::Stream(s) => {
                let _ = s.shutdown().await;
            }
            Transport::WebSocket(ws) => {
                let _ = ws.close().await;
            }
        }
    }
}
