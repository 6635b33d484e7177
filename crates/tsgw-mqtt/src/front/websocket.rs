//! MQTT over WebSocket: the upgrade, then a byte stream like any other.

use async_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use async_tungstenite::tungstenite::http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use ws_stream_tungstenite::WsStream;

/// Answers the upgrade with the `mqtt` subprotocol, which MQTT clients
/// (paho, mqtt.js, rumqttc) ask for and some insist on. Any path is accepted.
struct MqttSubprotocol;

impl Callback for MqttSubprotocol {
    fn on_request(
        self,
        request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        let asked = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
        if asked {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(response)
    }
}

/// Completes the WebSocket upgrade on `stream`.
pub async fn accept(
    stream: TcpStream,
) -> Result<impl AsyncRead + AsyncWrite + Unpin, async_tungstenite::tungstenite::Error> {
    let ws = async_tungstenite::tokio::accept_hdr_async(stream, MqttSubprotocol).await?;
    Ok(WsStream::new(ws))
}
