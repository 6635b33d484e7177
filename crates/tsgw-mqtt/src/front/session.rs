//! One device connection, packet by packet.
//!
//! ```text
//! device ──► inbound ──► rumqttd (loopback)     CONNECT: authenticated here, sent on without credentials
//!               │                                PUBLISH: ACL, readings → queue writer, relayed (write key removed)
//!               └──► queue writer                SUBSCRIBE: ACL; denied filters never reach rumqttd
//! device ◄── outbound ◄── rumqttd                rumqttd's PUBACK/PUBREC dropped, SUBACK patched,
//!               ▲                                everything else as it came
//!               └── our PUBACK/PUBREC, once the queue has fsynced the publish's readings
//! ```
//!
//! Flow control: inbound reads the device socket only after the previous
//! chunk's readings were handed to the queue writer, whose channel is bounded.
//! A writer that falls behind therefore stops the reads and TCP pushes back on
//! the device; nothing is dropped on the way in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::{self, FixedHeader, PacketType, Protocol, QoS};
use thingspeak::topic::Topic;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tsgw_core::{durable_pair, Durable, FeedTap, IngestBatch, Reading};

use super::feed::{self, Taps};
use super::subscriptions::{self, LocalSubscriptions};
use super::{Context, Dropped};
use crate::auth::{Identity, Refusal, ANONYMOUS};
use crate::dropin;
use crate::filter::TopicFilter;
use crate::ingest::{Mapping, Verdict};

/// Bytes read from a socket at a time. One chunk's publishes go to the queue
/// writer as one batch, so this also bounds a batch (and the memory a
/// connection holds while it waits for the writer).
const READ_CHUNK: usize = 16 * 1024;

/// Batches of acks a connection may have waiting for their fsync. A device
/// with more unacknowledged chunks in flight waits (its reads stop).
const PENDING_ACK_BATCHES: usize = 16;

/// The `user` label for a username no account has (device input must not
/// become a label: it could grow the metrics without bound).
const UNKNOWN_USER: &str = "unknown";

/// Serves one device from its first byte (after any TLS or WebSocket
/// handshake) to its disconnect.
pub async fn run<S>(
    device: S,
    ctx: Arc<Context>,
    loopback: bool,
    shutdown: CancellationToken,
) -> Result<(), Dropped>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + ctx.connect_timeout;
    let late = || {
        Dropped::ConnectTimeout(format!(
            "no CONNECT accepted within {:?}",
            ctx.connect_timeout
        ))
    };
    let (mut device_read, mut device_write) = tokio::io::split(device);
    let mut device_buf = BytesMut::with_capacity(READ_CHUNK);

    // CONNECT: who is this?
    let Some((header, frame)) = tokio::time::timeout_at(
        deadline,
        read_frame(&mut device_read, &mut device_buf, ctx.max_packet_bytes),
    )
    .await
    .map_err(|_| late())??
    else {
        return Ok(()); // closed before saying anything
    };
    if header.packet_type().ok() != Some(PacketType::Connect) {
        return Err(Dropped::protocol(
            "protocol",
            "the first packet is not CONNECT",
        ));
    }
    let mut connect = match Connect::read(header, frame.freeze()) {
        Ok(connect) if connect.protocol == Protocol::V4 => connect,
        Ok(_) | Err(mqttbytes::Error::InvalidProtocolLevel(_)) => {
            let _ =
                write_connack(&mut device_write, ConnectReturnCode::RefusedProtocolVersion).await;
            return Err(Dropped::protocol(
                "protocol_version",
                "only MQTT 3.1.1 is supported",
            ));
        }
        Err(e) => {
            return Err(Dropped::protocol(
                "protocol",
                format!("malformed CONNECT: {e}"),
            ))
        }
    };
    let mapping = ctx.mapping.borrow().clone();
    let login = connect
        .login
        .as_ref()
        .map(|l| (l.username.as_str(), l.password.as_str()));
    let identity = match mapping.accounts.authenticate(login, loopback).await {
        Ok(identity) => identity,
        Err(refusal) => {
            let code = match refusal {
                Refusal::Anonymous => ConnectReturnCode::NotAuthorized,
                Refusal::UnknownUser | Refusal::BadPassword => {
                    ConnectReturnCode::BadUserNamePassword
                }
            };
            let user = match (refusal, login) {
                (Refusal::BadPassword, Some((user, _))) => user.to_owned(),
                (Refusal::UnknownUser, _) => UNKNOWN_USER.to_owned(),
                _ => ANONYMOUS.to_owned(),
            };
            ctx.ingest
                .metrics()
                .mqtt_denied_total
                .with_label_values(&[refusal.reason(), &user])
                .inc();
            let _ = write_connack(&mut device_write, code).await;
            return Err(Dropped::Refused {
                reason: refusal.reason(),
                user,
                client_id: connect.client_id,
            });
        }
    };
    // rumqttd runs without auth: the credentials stop here.
    connect.login = None;
    // The front enforces the device's keep-alive itself: rumqttd sees only
    // what the front relays (not the publishes nobody subscribed to), so its
    // own timer would close a device that is busy publishing.
    let idle_limit = (connect.keep_alive > 0)
        .then(|| Duration::from_secs(connect.keep_alive.into()).mul_f32(1.5));
    connect.keep_alive = u16::MAX;

    let broker = tokio::time::timeout_at(deadline, TcpStream::connect(ctx.backend))
        .await
        .map_err(|_| late())?
        .map_err(|e| {
            Dropped::Io(format!(
                "embedded broker unreachable at {}: {e}",
                ctx.backend
            ))
        })?;
    let _ = broker.set_nodelay(true);
    let (mut broker_read, mut broker_write) = broker.into_split();
    let mut connect_frame = BytesMut::new();
    connect
        .write(&mut connect_frame)
        .map_err(|e| Dropped::protocol("protocol", format!("CONNECT not re-encodable: {e}")))?;
    broker_write
        .write_all(&connect_frame)
        .await
        .map_err(Dropped::io)?;
    let mut broker_buf = BytesMut::with_capacity(READ_CHUNK);
    let Some((header, connack)) = tokio::time::timeout_at(
        deadline,
        read_frame(&mut broker_read, &mut broker_buf, usize::MAX),
    )
    .await
    .map_err(|_| late())??
    else {
        return Err(Dropped::Io(
            "the embedded broker closed the connection before CONNACK".into(),
        ));
    };
    device_write
        .write_all(&connack)
        .await
        .map_err(Dropped::io)?;
    device_write.flush().await.map_err(Dropped::io)?;
    let accepted = header.packet_type().ok() == Some(PacketType::ConnAck)
        && ConnAck::read(header, connack.freeze())
            .map(|ack| ack.code == ConnectReturnCode::Success)
            .unwrap_or(false);
    if !accepted {
        return Ok(());
    }
    let session = Session::connected(
        &ctx.subscriptions,
        &connect.client_id,
        connect.clean_session,
    );

    let patches = SubackPatches::default();
    let (to_device, from_inbound) = mpsc::channel(PENDING_ACK_BATCHES);
    let inbound = Inbound {
        ctx: &ctx,
        publisher: identity.user.as_deref().map(Arc::from),
        identity,
        owner: &session.owner,
        patches: &patches,
        exactly_once: HashMap::new(),
        wanted: Arc::default(),
        idle_limit,
        taps: Taps::default(),
    }
    .run(device_read, device_buf, broker_write, to_device, shutdown);
    let outbound = outbound(
        broker_read,
        broker_buf,
        device_write,
        from_inbound,
        &patches,
    );
    // Either side ending ends the connection: a device that left, or rumqttd
    // dropping it (keep-alive expired, a session taken over by a new connection).
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
    }
}

/// A connected session's entry in the local subscription registry, removed
/// (for a clean session) however the connection ends.
struct Session<'a> {
    registry: &'a LocalSubscriptions,
    /// The client id, or a name of its own for an empty one (rumqttd gives
    /// those a fresh session each time).
    owner: String,
    clean: bool,
}

impl<'a> Session<'a> {
    fn connected(registry: &'a LocalSubscriptions, client_id: &str, clean: bool) -> Self {
        static ANONYMOUS_SESSIONS: std::sync::atomic::AtomicU64 =
            std::sync::atomic::AtomicU64::new(0);
        let owner = if client_id.is_empty() {
            let n = ANONYMOUS_SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("\u{0}{n}")
        } else {
            client_id.to_owned()
        };
        registry.connected(&owner, clean || client_id.is_empty());
        Session {
            registry,
            owner,
            clean: clean || client_id.is_empty(),
        }
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.registry.disconnected(&self.owner, self.clean);
    }
}

/// Frames for the device that must wait until `durable` resolves (the acks of
/// a chunk whose readings are being fsynced), or go at once (`None`).
pub(super) struct ToDevice {
    pub(super) frames: BytesMut,
    pub(super) durable: Option<Durable>,
}

/// For a SUBSCRIBE that rumqttd got only part of: for each of its filters,
/// its position in the (shorter) SUBSCRIBE rumqttd got, or the code the front
/// decided (a denied filter, or a ThingSpeak feed the front serves itself).
type SubackPatches = Mutex<HashMap<u16, Vec<SubackSlot>>>;

#[derive(Debug, Clone, Copy)]
enum SubackSlot {
    Broker(usize),
    Front(SubscribeReasonCode),
}

/// What one read from the device produced.
#[derive(Default)]
struct Chunk {
    readings: Vec<Reading>,
    /// A QoS 1/2 publish of this chunk carried readings: its ack waits for the fsync.
    wants_durable: bool,
    /// Packets for rumqttd, already encoded.
    relay: BytesMut,
    /// Packets for the device (acks), already encoded, in order.
    answers: BytesMut,
    /// ThingSpeak feeds granted in this chunk: relayed once the SUBACK is on its way.
    taps: Vec<(String, Topic, FeedTap)>,
}

struct Inbound<'a> {
    ctx: &'a Context,
    identity: Identity,
    /// The account's name, once per connection, for every batch it hands over.
    publisher: Option<Arc<str>>,
    /// This session's name in the local subscription registry.
    owner: &'a str,
    patches: &'a SubackPatches,
    /// The filters local clients hold, as of this chunk.
    wanted: Arc<Vec<TopicFilter>>,
    /// 1.5 × the device's keep-alive: silence for longer ends the connection.
    idle_limit: Option<Duration>,
    /// QoS 2 publishes answered with PUBREC and waiting for PUBREL, and whether
    /// rumqttd got them (a denied one is completed here).
    exactly_once: HashMap<u16, bool>,
    /// The ThingSpeak feeds this connection subscribed to, by filter; their
    /// relays end with the connection.
    taps: Taps,
}

impl Inbound<'_> {
    async fn run<R, W>(
        mut self,
        mut device: R,
        mut buf: BytesMut,
        mut broker: W,
        to_device: mpsc::Sender<ToDevice>,
        shutdown: CancellationToken,
    ) -> Result<(), Dropped>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let mapping = self.ctx.mapping.borrow().clone();
            self.wanted = self.ctx.subscriptions.snapshot();
            let mut chunk = Chunk::default();
            let mut disconnect = false;
            while let Some((header, frame)) = next_frame(&mut buf, self.ctx.max_packet_bytes)? {
                let kind = header
                    .packet_type()
                    .map_err(|e| Dropped::protocol("protocol", e.to_string()))?;
                match kind {
                    PacketType::Publish => self.publish(&mapping, header, frame, &mut chunk)?,
                    PacketType::PubRel => self.pubrel(header, frame, &mut chunk)?,
                    PacketType::Subscribe => self.subscribe(header, frame, &mut chunk).await?,
                    PacketType::Unsubscribe => self.unsubscribe(header, frame, &mut chunk)?,
                    PacketType::Disconnect => {
                        chunk.relay.extend_from_slice(&frame);
                        disconnect = true;
                        break;
                    }
                    PacketType::Connect => {
                        return Err(Dropped::protocol("protocol", "a second CONNECT"))
                    }
                    PacketType::ConnAck
                    | PacketType::SubAck
                    | PacketType::UnsubAck
                    | PacketType::PingResp => {
                        return Err(Dropped::protocol(
                            "protocol",
                            format!("{kind:?} is a server's packet"),
                        ))
                    }
                    // Acks of what rumqttd delivered to this device, pings,
                    // unsubscribes: rumqttd's business.
                    PacketType::PubAck
                    | PacketType::PubRec
                    | PacketType::PubComp
                    | PacketType::PingReq => chunk.relay.extend_from_slice(&frame),
                }
            }
            // Feed relays start once this chunk's SUBACK is queued for the
            // device (a SUBSCRIBE that also holds rumqttd filters gets its
            // SUBACK from rumqttd, possibly after the first feed PUBLISH,
            // which MQTT 3.1.1 §3.8.4 permits).
            let taps = std::mem::take(&mut chunk.taps);
            self.hand_over(chunk, &mut broker, &to_device).await?;
            for (filter, topic, tap) in taps {
                let relay = feed::relay(topic, tap, to_device.clone());
                self.taps.start(filter, tokio::spawn(relay));
            }
            if disconnect {
                return Ok(());
            }
            buf.reserve(READ_CHUNK);
            // Only the wait for the device counts against its keep-alive,
            // not the time it waited for us (backpressure).
            let idle = async {
                match self.idle_limit {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = idle => return Err(Dropped::protocol(
                    "keepalive",
                    "nothing received within 1.5 times the keep-alive",
                )),
                read = device.read_buf(&mut buf) => read,
            };
            if read.map_err(Dropped::io)? == 0 {
                return Ok(());
            }
        }
    }

    fn publish(
        &mut self,
        mapping: &Mapping,
        header: FixedHeader,
        frame: BytesMut,
        chunk: &mut Chunk,
    ) -> Result<(), Dropped> {
        let raw = frame.freeze();
        let publish = Publish::read(header, raw.clone())
            .map_err(|e| Dropped::protocol("protocol", format!("malformed PUBLISH: {e}")))?;
        if publish.topic.is_empty() || publish.topic.contains(['+', '#']) {
            return Err(Dropped::protocol(
                "bad_topic",
                "PUBLISH to an empty topic or one with wildcards",
            ));
        }
        if publish.qos == QoS::ExactlyOnce && self.exactly_once.contains_key(&publish.pkid) {
            // A redelivery of a QoS 2 publish we already took: exactly once.
            encode_into(&mut chunk.answers, |b| PubRec::new(publish.pkid).write(b));
            return Ok(());
        }
        let verdict = self.ctx.ingest.publish(
            mapping,
            &self.identity,
            &publish.topic,
            &publish.payload,
            Utc::now(),
        );
        let relayed = match verdict {
            Verdict::Accept {
                readings,
                relay_topic,
            } => {
                if !readings.is_empty() {
                    chunk.readings.extend(readings);
                    chunk.wants_durable |= publish.qos != QoS::AtMostOnce;
                }
                // Retained publishes always go: rumqttd keeps them for
                // subscribers yet to come.
                let relayed_as = relay_topic.as_deref().unwrap_or(&publish.topic);
                let relay = publish.retain || subscriptions::wanted(&self.wanted, relayed_as);
                match relay_topic {
                    _ if !relay => {}
                    None => chunk.relay.extend_from_slice(&raw),
                    Some(topic) => {
                        let relay = Publish {
                            topic,
                            ..publish.clone()
                        };
                        encode_into(&mut chunk.relay, |b| relay.write(b));
                    }
                }
                relay
            }
            Verdict::Deny => false,
        };
        // A denied publish is still acknowledged, as mosquitto does: MQTT
        // 3.1.1 has no negative PUBACK, and without one the device would
        // resend it forever. It was counted where it was denied.
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                encode_into(&mut chunk.answers, |b| PubAck::new(publish.pkid).write(b))
            }
            QoS::ExactlyOnce => {
                self.exactly_once.insert(publish.pkid, relayed);
                encode_into(&mut chunk.answers, |b| PubRec::new(publish.pkid).write(b));
            }
        }
        Ok(())
    }

    fn pubrel(
        &mut self,
        header: FixedHeader,
        frame: BytesMut,
        chunk: &mut Chunk,
    ) -> Result<(), Dropped> {
        let raw = frame.freeze();
        let rel = PubRel::read(header, raw.clone())
            .map_err(|e| Dropped::protocol("protocol", format!("malformed PUBREL: {e}")))?;
        match self.exactly_once.remove(&rel.pkid) {
            // rumqttd never saw a denied or unrelayed publish: complete it here.
            Some(false) => encode_into(&mut chunk.answers, |b| PubComp::new(rel.pkid).write(b)),
            Some(true) | None => chunk.relay.extend_from_slice(&raw),
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        header: FixedHeader,
        frame: BytesMut,
        chunk: &mut Chunk,
    ) -> Result<(), Dropped> {
        let subscribe = Subscribe::read(header, frame.freeze())
            .map_err(|e| Dropped::protocol("protocol", format!("malformed SUBSCRIBE: {e}")))?;
        let mut granted: Vec<SubscribeFilter> = Vec::new();
        let mut slots = Vec::with_capacity(subscribe.filters.len());
        for filter in subscribe.filters {
            match self.may_subscribe(&filter.path) {
                Ok(None) => {
                    slots.push(SubackSlot::Broker(granted.len()));
                    granted.push(filter);
                }
                Ok(Some(topic)) => match self.tap_feed(&topic, &filter.path).await {
                    Ok(tap) => {
                        chunk.taps.push((filter.path, topic, tap));
                        slots.push(SubackSlot::Front(SubscribeReasonCode::Success(
                            QoS::AtMostOnce,
                        )));
                    }
                    Err(()) => slots.push(SubackSlot::Front(SubscribeReasonCode::Failure)),
                },
                Err(reason) => {
                    self.ctx.ingest.deny(&self.identity, reason, &filter.path);
                    slots.push(SubackSlot::Front(SubscribeReasonCode::Failure));
                }
            }
        }
        if granted.is_empty() {
            let codes = slots
                .iter()
                .map(|slot| match slot {
                    SubackSlot::Front(code) => *code,
                    SubackSlot::Broker(_) => SubscribeReasonCode::Failure,
                })
                .collect();
            encode_into(&mut chunk.answers, |b| {
                SubAck::new(subscribe.pkid, codes).write(b)
            });
            return Ok(());
        }
        if slots.iter().any(|s| matches!(s, SubackSlot::Front(_))) {
            self.patches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(subscribe.pkid, slots);
        }
        self.ctx
            .subscriptions
            .subscribed(self.owner, granted.iter().map(|f| f.path.as_str()));
        let forwarded = Subscribe {
            pkid: subscribe.pkid,
            filters: granted,
        };
        encode_into(&mut chunk.relay, |b| forwarded.write(b));
        Ok(())
    }

    /// Taps the upstream feed a ThingSpeak subscribe topic names. A refusal
    /// is counted (`feed_<reason>`) and logged with its cause.
    async fn tap_feed(&self, topic: &Topic, path: &str) -> Result<FeedTap, ()> {
        let Some(feeds) = &self.ctx.feeds else {
            // No upstream feeds: granting would leave the device waiting for nothing.
            self.ctx
                .ingest
                .deny(&self.identity, "thingspeak_feed", path);
            return Err(());
        };
        let key = match topic {
            Topic::SubscribeJson { key, .. } | Topic::SubscribeFields { key, .. } => {
                key.as_ref().map(|k| k.expose().to_owned())
            }
            _ => None,
        };
        match feeds.subscribe(topic.channel(), key).await {
            Ok(tap) => Ok(tap),
            Err(refusal) => {
                let reason = feed::refusal_label(refusal.reason);
                self.ctx.ingest.deny(&self.identity, reason, path);
                tracing::warn!(
                    user = self.identity.name(),
                    topic = %topic.redacted(),
                    reason,
                    "ThingSpeak feed subscription refused: {}",
                    refusal.message
                );
                Err(())
            }
        }
    }

    fn unsubscribe(
        &mut self,
        header: FixedHeader,
        frame: BytesMut,
        chunk: &mut Chunk,
    ) -> Result<(), Dropped> {
        let raw = frame.freeze();
        let unsubscribe = Unsubscribe::read(header, raw.clone())
            .map_err(|e| Dropped::protocol("protocol", format!("malformed UNSUBSCRIBE: {e}")))?;
        let mut all_feeds = !unsubscribe.topics.is_empty();
        for topic in &unsubscribe.topics {
            all_feeds &= self.taps.stop(topic);
        }
        if all_feeds {
            // rumqttd never held these: the front answers.
            encode_into(&mut chunk.answers, |b| {
                rumqttc::mqttbytes::v4::UnsubAck::new(unsubscribe.pkid).write(b)
            });
            return Ok(());
        }
        self.ctx
            .subscriptions
            .unsubscribed(self.owner, unsubscribe.topics.iter().map(String::as_str));
        chunk.relay.extend_from_slice(&raw);
        Ok(())
    }

    /// Why a subscription is refused (the `reason` label), if it is; a
    /// ThingSpeak feed (served by the front, not rumqttd) comes back parsed.
    fn may_subscribe(&self, path: &str) -> Result<Option<Topic>, &'static str> {
        let filter = TopicFilter::new(path).map_err(|_| "bad_filter")?;
        if !self.identity.acl.may_subscribe(&filter) {
            return Err("subscribe_denied");
        }
        if dropin::is_thingspeak_topic(path) {
            if let Ok(topic) = Topic::parse(path) {
                if !topic.is_publish() {
                    return Ok(Some(topic));
                }
            }
        }
        Ok(None)
    }

    /// Hands the chunk's readings to the queue writer (waiting while it is
    /// behind), relays its packets to rumqttd and queues its acks.
    async fn hand_over<W: AsyncWrite + Unpin>(
        &self,
        chunk: Chunk,
        broker: &mut W,
        to_device: &mpsc::Sender<ToDevice>,
    ) -> Result<(), Dropped> {
        let mut durable = None;
        if !chunk.readings.is_empty() {
            let ack = if chunk.wants_durable {
                let (ack, fsynced) = durable_pair();
                durable = Some(fsynced);
                Some(ack)
            } else {
                None
            };
            let batch = IngestBatch {
                readings: chunk.readings,
                durable: ack,
                publisher: self.publisher.clone(),
            };
            let stopping = || Dropped::Io("the gateway is stopping".into());
            match self.ctx.intake.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(batch)) => {
                    self.ctx
                        .ingest
                        .metrics()
                        .ingest_backpressure_total
                        .with_label_values(&["mqtt"])
                        .inc();
                    self.ctx.intake.send(batch).await.map_err(|_| stopping())?;
                }
                Err(TrySendError::Closed(_)) => return Err(stopping()),
            }
        }
        if !chunk.relay.is_empty() {
            broker.write_all(&chunk.relay).await.map_err(Dropped::io)?;
        }
        if !chunk.answers.is_empty() {
            to_device
                .send(ToDevice {
                    frames: chunk.answers,
                    durable,
                })
                .await
                .map_err(|_| Dropped::Io("connection closing".into()))?;
        }
        Ok(())
    }
}

/// Writes to the device: rumqttd's packets as they come, and each batch of our
/// acks once its readings are on disk, in the order the publishes came.
async fn outbound<R, W>(
    mut broker: R,
    mut buf: BytesMut,
    mut device: W,
    mut from_inbound: mpsc::Receiver<ToDevice>,
    patches: &SubackPatches,
) -> Result<(), Dropped>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The batch of acks whose fsync is awaited; later batches wait behind it.
    let mut waiting: Option<ToDevice> = None;
    loop {
        let idle = waiting.is_none();
        let fsynced = async {
            match waiting.as_mut().and_then(|w| w.durable.as_mut()) {
                Some(durable) => durable.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            stored = fsynced => {
                if !stored {
                    // The disk failed: no ack. The device keeps its copies and
                    // sends them again after it reconnects.
                    return Err(Dropped::NotStored);
                }
                if let Some(acks) = waiting.take() {
                    write_flush(&mut device, &acks.frames).await?;
                }
            }
            next = from_inbound.recv(), if idle => match next {
                None => return Ok(()),
                Some(acks) if acks.durable.is_some() => waiting = Some(acks),
                Some(acks) => write_flush(&mut device, &acks.frames).await?,
            },
            read = broker.read_buf(&mut buf) => {
                if read.map_err(Dropped::io)? == 0 {
                    // rumqttd ended the session (keep-alive expired, the same
                    // client id connected again): what the device sent after
                    // its last read is not taken.
                    return Err(Dropped::BrokerClosed);
                }
                let mut out = BytesMut::new();
                while let Some((header, frame)) = next_frame(&mut buf, usize::MAX)? {
                    match header.packet_type() {
                        // rumqttd acks the device's publishes on receipt; the
                        // device hears it from us only after the fsync.
                        Ok(PacketType::PubAck | PacketType::PubRec) => {}
                        Ok(PacketType::SubAck) => patch_suback(header, frame, patches, &mut out)?,
                        _ => out.extend_from_slice(&frame),
                    }
                }
                if !out.is_empty() {
                    write_flush(&mut device, &out).await?;
                }
                buf.reserve(READ_CHUNK);
            }
        }
    }
}

/// Puts the front's codes (denied filters, feeds it serves) back into rumqttd's SUBACK.
fn patch_suback(
    header: FixedHeader,
    frame: BytesMut,
    patches: &SubackPatches,
    out: &mut BytesMut,
) -> Result<(), Dropped> {
    let raw: Bytes = frame.freeze();
    let suback = SubAck::read(header, raw.clone())
        .map_err(|e| Dropped::Io(format!("malformed SUBACK from the embedded broker: {e}")))?;
    let patch = patches
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&suback.pkid);
    match patch {
        None => out.extend_from_slice(&raw),
        Some(slots) => {
            let codes = slots
                .iter()
                .map(|slot| match slot {
                    SubackSlot::Broker(i) => suback
                        .return_codes
                        .get(*i)
                        .copied()
                        .unwrap_or(SubscribeReasonCode::Failure),
                    SubackSlot::Front(code) => *code,
                })
                .collect();
            encode_into(out, |b| SubAck::new(suback.pkid, codes).write(b));
        }
    }
    Ok(())
}

/// Reads until `buf` holds one whole packet and splits it off; `None` when
/// the peer closed first.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Option<(FixedHeader, BytesMut)>, Dropped> {
    loop {
        if let Some(frame) = next_frame(buf, max_packet_bytes)? {
            return Ok(Some(frame));
        }
        buf.reserve(READ_CHUNK);
        if reader.read_buf(buf).await.map_err(Dropped::io)? == 0 {
            return Ok(None);
        }
    }
}

/// Splits the next whole packet off `buf`, or `None` if more bytes are needed.
fn next_frame(
    buf: &mut BytesMut,
    max_packet_bytes: usize,
) -> Result<Option<(FixedHeader, BytesMut)>, Dropped> {
    match mqttbytes::check(buf.iter(), max_packet_bytes) {
        Ok(header) => Ok(Some((header, buf.split_to(header.frame_length())))),
        Err(mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => Err(Dropped::protocol(
            "payload_too_large",
            format!("a packet of {size} bytes is over mqtt.max_payload_bytes ({max_packet_bytes})"),
        )),
        Err(e) => Err(Dropped::protocol(
            "protocol",
            format!("malformed packet: {e}"),
        )),
    }
}

/// Appends an encoded packet. Encoding into a growable buffer fails only for
/// sizes MQTT cannot express, which packets we parsed or built never have.
fn encode_into(
    buf: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>,
) {
    let before = buf.len();
    if write(buf).is_err() {
        buf.truncate(before);
    }
}

async fn write_connack<W: AsyncWrite + Unpin>(
    device: &mut W,
    code: ConnectReturnCode,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    encode_into(&mut buf, |b| ConnAck::new(code, false).write(b));
    device.write_all(&buf).await?;
    device.flush().await
}

async fn write_flush<W: AsyncWrite + Unpin>(device: &mut W, bytes: &[u8]) -> Result<(), Dropped> {
    device.write_all(bytes).await.map_err(Dropped::io)?;
    device.flush().await.map_err(Dropped::io)
}
