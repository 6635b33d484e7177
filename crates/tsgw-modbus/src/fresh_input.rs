//! A serial port wrapper that keeps stale bytes out of RTU answers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_serial::{SerialPort as _, SerialStream};

/// A serial port that discards unread input whenever a request is written.
///
/// RTU frames carry no transaction id: a unit that answers after its timeout
/// would otherwise have its late frame taken for the answer to the next request.
/// On a half-duplex bus nothing that arrived before a request can answer it, so
/// dropping it is always safe.
pub(crate) struct FreshInput {
    port: SerialStream,
    path: String,
}

impl AsyncRead for FreshInput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.port).poll_read(cx, buf)
    }
}

impl AsyncWrite for FreshInput {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(err) = self.port.clear(tokio_serial::ClearBuffer::Input) {
            tracing::debug!(path = %self.path, "cannot discard stale serial input: {err}");
        }
        Pin::new(&mut self.port).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.port).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.port).poll_shutdown(cx)
    }
}

impl FreshInput {
    pub(crate) fn new(port: SerialStream, path: String) -> Self {
        FreshInput { port, path }
    }
}
