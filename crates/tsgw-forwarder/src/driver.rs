//! Drives one rumqttc connection and reports what matters to the forwarder.
//!
//! Every connection attempt gets a fresh `EventLoop` and a generation number,
//! and the driver ends at the first error. So a publish handed to one
//! connection can never be written on a later one, and an
//! `Outgoing::Publish` event is always attributed to the right connection.

use bytes::Bytes;
use rumqttc::{
    ConnectReturnCode, ConnectionError, Event, EventLoop, Outgoing, Packet, StateError,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

/// What happened on connection `generation`.
#[derive(Debug)]
pub struct ConnEvent {
    pub generation: u64,
    pub kind: ConnEventKind,
}

#[derive(Debug)]
pub enum ConnEventKind {
    /// CONNACK accepted.
    Connected,
    /// A PUBLISH was written and flushed to the socket.
    Written,
    /// A SUBSCRIBE with this packet id was written (in the order requested).
    SubscribeSent(u16),
    /// The broker answered SUBSCRIBE `pkid`: granted or refused.
    SubAck { pkid: u16, granted: bool },
    /// A message on a subscribed topic.
    Message { topic: String, payload: Bytes },
    /// The connection ended (or never came up). The driver has stopped.
    Closed(Closed),
}

/// Why a connection ended, in a form the forwarder can act on and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Short metric label.
    pub reason: &'static str,
    /// Set when the broker refused the CONNECT with a code retrying will not fix soon.
    pub refused: Option<ConnectReturnCode>,
    /// Human-readable cause (never contains credentials: rumqttc errors do not carry them).
    pub message: String,
}

impl Closed {
    pub fn from_error(e: &ConnectionError) -> Self {
        let reason = match e {
            ConnectionError::ConnectionRefused(_) => "refused",
            ConnectionError::NetworkTimeout => "connect_timeout",
            ConnectionError::FlushTimeout => "write_timeout",
            ConnectionError::Tls(_) => "tls",
            ConnectionError::Io(_) => "io",
            ConnectionError::MqttState(StateError::AwaitPingResp) => "ping_timeout",
            ConnectionError::MqttState(StateError::ConnectionAborted) => "closed_by_peer",
            ConnectionError::MqttState(StateError::Io(_)) => "io",
            ConnectionError::MqttState(_) | ConnectionError::NotConnAck(_) => "protocol",
            ConnectionError::Websocket(_)
            | ConnectionError::WsConnect(_)
            | ConnectionError::InvalidUrl(_)
            | ConnectionError::ResponseValidation(_) => "websocket",
            ConnectionError::RequestsDone => "shutdown",
        };
        let refused = match e {
            ConnectionError::ConnectionRefused(code) => Some(*code),
            _ => None,
        };
        Closed {
            reason,
            refused,
            message: e.to_string(),
        }
    }

    /// True for refusals that mean "your credentials or device settings are
    /// wrong": retrying fast cannot help.
    pub fn is_auth_refusal(&self) -> bool {
        matches!(
            self.refused,
            Some(ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized)
        )
    }
}

/// Polls `eventloop` until the connection ends, forwarding events.
pub async fn drive(mut eventloop: EventLoop, generation: u64, tx: mpsc::Sender<ConnEvent>) {
    loop {
        let kind = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => ConnEventKind::Connected,
            Ok(Event::Outgoing(Outgoing::Publish(_))) => ConnEventKind::Written,
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => ConnEventKind::SubscribeSent(pkid),
            Ok(Event::Incoming(Packet::SubAck(ack))) => ConnEventKind::SubAck {
                pkid: ack.pkid,
                granted: !ack.return_codes.is_empty()
                    && ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            },
            Ok(Event::Incoming(Packet::Publish(p))) => ConnEventKind::Message {
                topic: p.topic,
                payload: p.payload,
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => ConnEventKind::Closed(Closed {
                reason: "shutdown",
                refused: None,
                message: "disconnected on shutdown".into(),
            }),
            Ok(_) => continue,
            Err(e) => ConnEventKind::Closed(Closed::from_error(&e)),
        };
        let last = matches!(kind, ConnEventKind::Closed(_));
        if tx.send(ConnEvent { generation, kind }).await.is_err() || last {
            return;
        }
    }
}
