//! One MQTT connection, from CONNECT to close, with ThingSpeak's rules:
//! CONNECT checks (CONNACK 5), publish checks (violations close the
//! connection), the rate limit, subscriptions with last-entry delivery and
//! relays, and the idle timeout that PINGREQs do not reset.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, Publish, SubAck, Subscribe, SubscribeReasonCode,
    UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use thingspeak::limits::check_connect;
use thingspeak::{parse_field_value, ChannelId, ChannelUpdate, FieldFilter, Target, Topic};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{sleep_until, Duration, Instant};
use tracing::{debug, info, warn};

use crate::core::{Core, Identity};
use crate::counters::LiveCounters;
use crate::faults::RefuseMode;
use crate::listeners::Kind;
use crate::mqtt::transport::Transport;
use crate::state::{Entry, WriteOrigin};

/// Largest packet accepted. Bigger than ThingSpeak's 3000-byte message limit so
/// that an oversized publish is reported as such rather than as a framing error.
const MAX_PACKET: usize = 64 * 1024;

/// Why a session ended; decides the counter and the log line.
#[derive(Debug)]
enum Close {
    /// The client disconnected (DISCONNECT or end of stream).
    Client(&'static str),
    /// A protocol or ThingSpeak rule was broken.
    Invalid(String),
    Idle,
    KeepAlive,
    Dropped,
    TakenOver,
    Io(String),
}

struct Subscription {
    /// The topic filter as the client sent it (used to unsubscribe).
    filter: String,
    topic: Topic,
    /// Highest entry id already sent, so the initial entry and relays never repeat.
    sent_up_to: u64,
}

struct Session {
    core: Arc<Core>,
    transport: Transport,
    peer: SocketAddr,
    kind: Kind,
    client_id: String,
    identity: Identity,
    subs: Vec<Subscription>,
    out: BytesMut,
}

pub(crate) async fn run(core: Arc<Core>, mut transport: Transport, peer: SocketAddr, kind: Kind) {
    let drop_token = core.connection_token();
    let mut buf = BytesMut::with_capacity(4096);
    let wait = core.session.handshake_timeout;
    let connect = tokio::select! {
        _ = drop_token.cancelled() => {
            LiveCounters::inc(&core.counters.closed_by_fault);
            info!(%peer, transport = %kind, reason = "connections dropped", "connection closed");
            transport.close().await;
            return;
        }
        r = tokio::time::timeout(wait, read_connect(&mut transport, &mut buf)) => r,
    };
    let connect = match connect {
        Err(_) => Err(ConnectFailure::Abandoned(
            "no CONNECT within the handshake timeout".into(),
        )),
        Ok(r) => r,
    };
    let connect = match connect {
        Ok(c) => c,
        Err(failure) => {
            refuse(&core, &mut transport, peer, kind, failure).await;
            return;
        }
    };
    let client_id = connect.client_id.clone();
    let identity = match admit(&core, &connect) {
        Ok(identity) => identity,
        Err(failure) => {
            refuse(&core, &mut transport, peer, kind, failure).await;
            return;
        }
    };
    let mut session = Session {
        core: core.clone(),
        transport,
        peer,
        kind,
        client_id,
        identity,
        subs: Vec::new(),
        out: BytesMut::with_capacity(1024),
    };
    if let Err(e) = session
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
    {
        info!(%peer, transport = %kind, reason = %e, "connection closed");
        return;
    }
    LiveCounters::inc(&core.counters.sessions);
    let who = match &session.identity {
        Identity::Device { .. } => "device",
        Identity::Legacy => "legacy",
    };
    info!(%peer, transport = %kind, client_id = %session.client_id, auth = who, "session open");

    let (registration, taken_over) = core.register_session(&session.client_id);
    let reason = tokio::select! {
        r = session.serve(buf, connect.keep_alive, drop_token) => r,
        _ = taken_over.cancelled() => Close::TakenOver,
    };
    core.unregister_session(&session.client_id, registration);
    session.finish(reason).await;
}

enum ConnectFailure {
    /// Refused: answer with this CONNACK code, then close.
    Refuse(ConnectReturnCode, String),
    /// Refused by the refusal fault in "close" mode: close without answering.
    RefuseClose(String),
    /// Not MQTT as ThingSpeak speaks it (malformed, or not starting with CONNECT).
    Invalid(String),
    /// The client went away or stayed silent before CONNECT.
    Abandoned(String),
}

async fn read_connect(
    transport: &mut Transport,
    buf: &mut BytesMut,
) -> Result<Connect, ConnectFailure> {
    loop {
        // Peeked before parsing: a failed parse has already consumed the packet.
        let will_bits_only = will_flags_without_will(buf);
        match Packet::read(buf, MAX_PACKET) {
            Ok(Packet::Connect(c)) => return Ok(c),
            Ok(other) => {
                return Err(ConnectFailure::Invalid(format!(
                    "first packet is {} instead of CONNECT",
                    packet_name(&other)
                )))
            }
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(CodecError::InvalidProtocolLevel(level)) => {
                // e.g. a mosquitto bridge's private level 0x84, or MQTT 3.1 / 5.
                let v = check_connect(level, true, false)
                    .err()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| format!("protocol level {level}"));
                return Err(ConnectFailure::Refuse(ConnectReturnCode::NotAuthorized, v));
            }
            Err(CodecError::IncorrectPacketFormat) if will_bits_only => {
                return Err(ConnectFailure::Refuse(
                    ConnectReturnCode::NotAuthorized,
                    "Will retain/QoS flags set (a Will is not allowed)".into(),
                ))
            }
            Err(e) => return Err(ConnectFailure::Invalid(format!("malformed CONNECT: {e}"))),
        }
        match transport.read_into(buf).await {
            Ok(true) => {}
            Ok(false) => return Err(ConnectFailure::Abandoned("closed before CONNECT".into())),
            Err(e) => {
                return Err(ConnectFailure::Abandoned(format!(
                    "read error before CONNECT: {e}"
                )))
            }
        }
    }
}

/// rumqttc rejects a CONNECT whose Will retain/QoS bits are set without the Will
/// flag as malformed; ThingSpeak refuses any Will-related flag with CONNACK 5.
/// This peeks at the connect-flags byte of the (unconsumed) packet in `buf`.
fn will_flags_without_will(buf: &[u8]) -> bool {
    // Fixed header: type byte, then 1..4 remaining-length bytes (high bit = more).
    if buf.first().map(|b| b >> 4) != Some(1) {
        return false;
    }
    let mut i = 1;
    while buf.get(i).is_some_and(|b| b & 0x80 != 0) && i < 4 {
        i += 1;
    }
    // Then protocol name (2-byte length + "MQTT"), level, flags.
    let name_len = match (buf.get(i + 1), buf.get(i + 2)) {
        (Some(&hi), Some(&lo)) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return false,
    };
    let flags_at = i + 1 + 2 + name_len + 1;
    buf.get(flags_at)
        .is_some_and(|f| f & 0b0000_0100 == 0 && f & 0b0011_1000 != 0)
}

/// ThingSpeak's CONNECT rules, the refusal fault, and the credentials.
fn admit(core: &Core, c: &Connect) -> Result<Identity, ConnectFailure> {
    if let Some(mode) = core.faults.refusing() {
        let why = "refusing connections (fault injection)".to_string();
        return Err(match mode {
            RefuseMode::ServerUnavailable => {
                ConnectFailure::Refuse(ConnectReturnCode::ServiceUnavailable, why)
            }
            RefuseMode::Close => ConnectFailure::RefuseClose(why),
        });
    }
    let level = match c.protocol {
        Protocol::V4 => 4,
        Protocol::V5 => 5,
    };
    if let Err(v) = check_connect(level, c.clean_session, c.last_will.is_some()) {
        return Err(ConnectFailure::Refuse(
            ConnectReturnCode::NotAuthorized,
            v.to_string(),
        ));
    }
    if c.last_will.as_ref().is_some_and(|w| w.retain) {
        return Err(ConnectFailure::Refuse(
            ConnectReturnCode::NotAuthorized,
            "Will retain is not allowed".into(),
        ));
    }
    let (username, password) = c
        .login
        .as_ref()
        .map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
    core.authenticate(&c.client_id, username, password)
        .ok_or_else(|| {
            ConnectFailure::Refuse(
                ConnectReturnCode::NotAuthorized,
                format!(
                    "bad credentials for client id {:?} (username {username:?})",
                    c.client_id
                ),
            )
        })
}

async fn refuse(
    core: &Core,
    transport: &mut Transport,
    peer: SocketAddr,
    kind: Kind,
    failure: ConnectFailure,
) {
    let c = &core.counters;
    match failure {
        ConnectFailure::Refuse(code, reason) => {
            LiveCounters::inc(&c.refusals);
            warn!(%peer, transport = %kind, connack = code as u8, %reason, "connection refused");
            let mut out = BytesMut::new();
            if Packet::ConnAck(ConnAck::new(code, false))
                .write(&mut out, MAX_PACKET)
                .is_ok()
            {
                let _ = transport.write_all(out.freeze()).await;
            }
        }
        ConnectFailure::RefuseClose(reason) => {
            LiveCounters::inc(&c.refusals);
            warn!(%peer, transport = %kind, %reason, "connection refused");
        }
        ConnectFailure::Invalid(reason) => {
            LiveCounters::inc(&c.closed_invalid);
            warn!(%peer, transport = %kind, %reason, "connection closed");
        }
        ConnectFailure::Abandoned(reason) => {
            LiveCounters::inc(&c.handshake_failures);
            info!(%peer, transport = %kind, %reason, "connection closed");
        }
    }
    transport.close().await;
}

impl Session {
    async fn serve(
        &mut self,
        mut buf: BytesMut,
        keep_alive: u16,
        drop_token: tokio_util::sync::CancellationToken,
    ) -> Close {
        let idle_timeout = self.core.session.idle_timeout;
        // MQTT 3.1.1 §3.1.2.10: a server may close after 1.5x keep-alive without any packet.
        let keep_alive =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut relay = self.core.relay.subscribe();
        let mut idle_deadline = Instant::now() + idle_timeout;
        let mut last_packet = Instant::now();
        loop {
            // Drain every complete packet before waiting again.
            loop {
                match Packet::read(&mut buf, MAX_PACKET) {
                    Ok(packet) => {
                        last_packet = Instant::now();
                        match self.handle(packet).await {
                            Ok(Activity::Yes) => idle_deadline = Instant::now() + idle_timeout,
                            Ok(Activity::No) => {}
                            Err(close) => return close,
                        }
                    }
                    Err(CodecError::InsufficientBytes(_)) => break,
                    Err(e) => return Close::Invalid(format!("malformed packet: {e}")),
                }
            }
            let keep_alive_deadline = keep_alive.map(|k| last_packet + k);
            tokio::select! {
                _ = drop_token.cancelled() => return Close::Dropped,
                _ = sleep_until(idle_deadline) => return Close::Idle,
                _ = sleep_until(keep_alive_deadline.unwrap_or(idle_deadline)), if keep_alive_deadline.is_some() => {
                    return Close::KeepAlive
                }
                read = self.transport.read_into(&mut buf) => match read {
                    Ok(true) => {}
                    Ok(false) => return Close::Client("connection closed by client"),
                    Err(e) => return Close::Io(e.to_string()),
                },
                entry = relay.recv() => match entry {
                    Ok(entry) => {
                        if let Err(e) = self.deliver(&entry).await {
                            return Close::Io(e.to_string());
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        warn!(peer = %self.peer, client_id = %self.client_id, missed = n, "subscriber too slow, entries not relayed");
                    }
                    Err(RecvError::Closed) => return Close::Dropped,
                },
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<Activity, Close> {
        match packet {
            Packet::Publish(p) => {
                LiveCounters::inc(&self.core.counters.publishes);
                self.publish(p)?;
                Ok(Activity::Yes)
            }
            Packet::Subscribe(s) => {
                self.subscribe(s).await?;
                Ok(Activity::Yes)
            }
            Packet::Unsubscribe(u) => {
                self.unsubscribe(u).await?;
                Ok(Activity::No)
            }
            Packet::PingReq => {
                self.send(Packet::PingResp)
                    .await
                    .map_err(|e| Close::Io(e.to_string()))?;
                Ok(Activity::No)
            }
            Packet::Disconnect => Err(Close::Client("DISCONNECT")),
            other => Err(Close::Invalid(format!(
                "unexpected {} from a client",
                packet_name(&other)
            ))),
        }
    }

    /// Validates and stores a publish. Errors close the connection, as ThingSpeak does.
    fn publish(&mut self, p: Publish) -> Result<(), Close> {
        thingspeak::limits::check_publish(p.qos as u8, p.retain, p.payload.len())
            .map_err(|v| Close::Invalid(format!("publish: {v}")))?;
        let topic = Topic::parse(&p.topic).map_err(|e| Close::Invalid(format!("publish: {e}")))?;
        let (channel, update) = match &topic {
            Topic::Publish { channel, key } => {
                self.authorize_publish(*channel, key.as_ref().map(|k| k.expose()), &topic)?;
                let update = ChannelUpdate::parse(&p.payload)
                    .map_err(|e| Close::Invalid(format!("publish to {}: {e}", topic.redacted())))?;
                (*channel, update)
            }
            Topic::PublishField {
                channel,
                field,
                key,
            } => {
                self.authorize_publish(*channel, key.as_ref().map(|k| k.expose()), &topic)?;
                let value = parse_field_value(*field, &p.payload)
                    .map_err(|e| Close::Invalid(format!("publish to {}: {e}", topic.redacted())))?;
                let mut update = ChannelUpdate::new();
                update.set(Target::Field(*field), value);
                (*channel, update)
            }
            _ => {
                return Err(Close::Invalid(format!(
                    "publish to a subscribe topic {}",
                    topic.redacted()
                )))
            }
        };
        if self.core.faults.take_publish_drop() {
            LiveCounters::inc(&self.core.counters.dropped_fault);
            debug!(client_id = %self.client_id, %channel, "publish dropped (fault injection)");
            return Ok(());
        }
        match self.core.write(channel, &update, WriteOrigin::Mqtt) {
            Ok(entry) => {
                debug!(client_id = %self.client_id, %channel, entry_id = entry.entry_id(), "update accepted")
            }
            // Silently lost, like ThingSpeak does with QoS 0; counted by Core::write.
            Err(e) => debug!(client_id = %self.client_id, reason = %e, "update dropped"),
        }
        Ok(())
    }

    fn authorize_publish(
        &self,
        channel: ChannelId,
        key: Option<&str>,
        topic: &Topic,
    ) -> Result<(), Close> {
        let store = self.core.store();
        let spec = store
            .channel(channel)
            .ok_or_else(|| Close::Invalid(format!("publish to unknown channel {channel}")))?;
        match key {
            Some(k) if k == spec.write_key => Ok(()),
            Some(_) => Err(Close::Invalid(format!(
                "wrong write API key in topic {}",
                topic.redacted()
            ))),
            None if self.device_covers(channel) => Ok(()),
            None => Err(Close::Invalid(format!(
                "credentials do not cover channel {channel}"
            ))),
        }
    }

    fn device_covers(&self, channel: ChannelId) -> bool {
        matches!(&self.identity, Identity::Device { channels, .. } if channels.contains(&channel))
    }

    /// Whether this session may read `topic`'s channel.
    fn may_subscribe(&self, topic: &Topic) -> bool {
        let channel = topic.channel();
        let store = self.core.store();
        let Some(spec) = store.channel(channel) else {
            return false;
        };
        let key = match topic {
            Topic::Subscribe { .. } => return self.device_covers(channel),
            Topic::SubscribeJson { key, .. } | Topic::SubscribeFields { key, .. } => key,
            Topic::Publish { .. } | Topic::PublishField { .. } => return false,
        };
        match (key, &spec.read_key) {
            (Some(given), Some(read_key)) => given.expose() == read_key,
            // A public channel needs no key; any given key is ignored.
            (_, None) => true,
            (None, Some(_)) => self.device_covers(channel),
        }
    }

    async fn subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut granted = Vec::new();
        for f in &s.filters {
            let topic = Topic::parse(&f.path).ok().filter(|t| !t.is_publish());
            match topic {
                Some(topic) if self.may_subscribe(&topic) => {
                    LiveCounters::inc(&self.core.counters.subscriptions);
                    info!(peer = %self.peer, client_id = %self.client_id, topic = %topic.redacted(), "subscribed");
                    codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                    self.subs.retain(|old| old.filter != f.path);
                    self.subs.push(Subscription {
                        filter: f.path.clone(),
                        topic,
                        sent_up_to: 0,
                    });
                    granted.push(self.subs.len() - 1);
                }
                _ => {
                    LiveCounters::inc(&self.core.counters.subscriptions_refused);
                    let shown =
                        Topic::parse(&f.path).map_or_else(|e| e.to_string(), |t| t.redacted());
                    warn!(peer = %self.peer, client_id = %self.client_id, topic = %shown, "subscription refused");
                    codes.push(SubscribeReasonCode::Failure);
                }
            }
        }
        self.send(Packet::SubAck(SubAck::new(s.pkid, codes)))
            .await
            .map_err(|e| Close::Io(e.to_string()))?;
        // ThingSpeak delivers the channel's last entry right after subscribing.
        for index in granted {
            let Some(sub) = self.subs.get(index) else {
                continue;
            };
            let last = self.core.store().last_entry(sub.topic.channel()).cloned();
            if let Some(entry) = last {
                self.deliver_to(index, &entry)
                    .await
                    .map_err(|e| Close::Io(e.to_string()))?;
            }
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        self.subs.retain(|s| !u.topics.contains(&s.filter));
        self.send(Packet::UnsubAck(UnsubAck::new(u.pkid)))
            .await
            .map_err(|e| Close::Io(e.to_string()))
    }

    async fn deliver(&mut self, entry: &Entry) -> std::io::Result<()> {
        for index in 0..self.subs.len() {
            self.deliver_to(index, entry).await?;
        }
        Ok(())
    }

    /// Sends `entry` to subscription `index` if it matches and was not sent yet.
    async fn deliver_to(&mut self, index: usize, entry: &Entry) -> std::io::Result<()> {
        let Some(sub) = self.subs.get_mut(index) else {
            return Ok(());
        };
        if sub.topic.channel() != entry.channel() || entry.entry_id() <= sub.sent_up_to {
            return Ok(());
        }
        sub.sent_up_to = entry.entry_id();
        let messages = messages_for(&sub.topic, entry);
        for (topic, payload) in messages {
            self.send(Packet::Publish(Publish::from_bytes(
                topic,
                QoS::AtMostOnce,
                payload,
            )))
            .await?;
            LiveCounters::inc(&self.core.counters.relayed);
        }
        Ok(())
    }

    async fn send(&mut self, packet: Packet) -> std::io::Result<()> {
        self.out.clear();
        packet
            .write(&mut self.out, MAX_PACKET)
            .map_err(std::io::Error::other)?;
        let bytes = self.out.split().freeze();
        self.transport.write_all(bytes).await
    }

    async fn finish(mut self, reason: Close) {
        let c = &self.core.counters;
        let text = match &reason {
            Close::Client(why) => why.to_string(),
            Close::Invalid(why) => {
                LiveCounters::inc(&c.closed_invalid);
                why.clone()
            }
            Close::Idle => {
                LiveCounters::inc(&c.closed_idle);
                format!(
                    "idle for {:?} (no PUBLISH or SUBSCRIBE)",
                    self.core.session.idle_timeout
                )
            }
            Close::KeepAlive => {
                LiveCounters::inc(&c.closed_keepalive);
                "no packet within 1.5x keep-alive".into()
            }
            Close::TakenOver => {
                LiveCounters::inc(&c.closed_taken_over);
                "a new connection took over the client id".into()
            }
            Close::Dropped => {
                LiveCounters::inc(&c.closed_by_fault);
                "connections dropped".into()
            }
            Close::Io(e) => format!("I/O error: {e}"),
        };
        info!(peer = %self.peer, transport = %self.kind, client_id = %self.client_id, reason = %text, "connection closed");
        self.transport.close().await;
    }
}

enum Activity {
    /// PUBLISH or SUBSCRIBE: resets the idle timer.
    Yes,
    /// Anything else (PINGREQ in particular) does not.
    No,
}

/// The messages a subscription gets for an entry: the JSON entry for feed
/// subscriptions, the bare value of each matching field for field subscriptions.
fn messages_for(topic: &Topic, entry: &Entry) -> Vec<(String, Bytes)> {
    match topic {
        Topic::Subscribe { .. } | Topic::SubscribeJson { .. } => {
            match serde_json::to_vec(&entry.data) {
                Ok(json) => vec![(topic.to_string(), Bytes::from(json))],
                Err(_) => Vec::new(),
            }
        }
        Topic::SubscribeFields {
            channel,
            fields,
            key,
        } => thingspeak::Field::all()
            .filter(|f| fields.matches(*f))
            .filter_map(|f| {
                let value = entry.data.get(Target::Field(f))?;
                let t = Topic::SubscribeFields {
                    channel: *channel,
                    fields: FieldFilter::One(f),
                    key: key.clone(),
                };
                Some((t.to_string(), Bytes::copy_from_slice(value.as_bytes())))
            })
            .collect(),
        Topic::Publish { .. } | Topic::PublishField { .. } => Vec::new(),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn will_retain_without_will_is_detected() {
        // CONNECT, remaining length, "MQTT", level 4, flags 0x22 (clean + will retain).
        let mut pkt = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x22, 0, 60, 0, 0];
        assert!(will_flags_without_will(&pkt));
        pkt[9] = 0x02;
        assert!(!will_flags_without_will(&pkt));
        assert!(!will_flags_without_will(&[0x10]));
        assert!(!will_flags_without_will(&[]));
    }
}
