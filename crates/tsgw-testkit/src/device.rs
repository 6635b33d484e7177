//! MQTT devices for the gateway's local broker (rumqttc clients).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

use crate::CONNECT_WAIT;

fn options(broker: SocketAddr, id: &str) -> MqttOptions {
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts
}

/// Spawns `run` (the event loop's driver, which must send on its oneshot at
/// CONNACK) and waits for the CONNACK.
async fn connected(
    broker: SocketAddr,
    id: &str,
    run: impl FnOnce(oneshot::Sender<()>) -> tokio::task::JoinHandle<()>,
) -> Result<tokio::task::JoinHandle<()>> {
    let (tx, rx) = oneshot::channel();
    let task = run(tx);
    match tokio::time::timeout(CONNECT_WAIT, rx).await {
        Ok(Ok(())) => Ok(task),
        Ok(Err(_)) => {
            task.abort();
            Err(anyhow!("device {id}: connection to {broker} failed"))
        }
        Err(_) => {
            task.abort();
            Err(anyhow!(
                "device {id} did not connect to {broker} in {CONNECT_WAIT:?}"
            ))
        }
    }
}

/// A device that keeps reconnecting (rumqttc's own retry, every 100 ms) and
/// counts the PUBLISH packets it wrote. Dropping it stops its event loop.
pub struct Device {
    pub client: AsyncClient,
    /// PUBLISH packets written to the socket (rumqttc reports them after the write).
    pub sent: Arc<AtomicU64>,
    eventloop: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects `id` to `broker` with a request queue of `capacity`; waits for CONNACK.
    pub async fn connect(broker: SocketAddr, id: &str, capacity: usize) -> Result<Device> {
        Self::start(broker, id, options(broker, id), capacity).await
    }

    /// [`Device::connect`] logged in as an account of `[mqtt.users]`.
    pub async fn connect_as(
        broker: SocketAddr,
        id: &str,
        (user, password): (&str, &str),
        capacity: usize,
    ) -> Result<Device> {
        let mut opts = options(broker, id);
        opts.set_credentials(user, password);
        Self::start(broker, id, opts, capacity).await
    }

    /// [`Device::connect`] with a persistent session (clean session off):
    /// publishes the gateway did not acknowledge are sent again after a
    /// reconnect, as the gateway expects when it cannot store them (it acks
    /// only once they are on disk).
    pub async fn connect_persistent(
        broker: SocketAddr,
        id: &str,
        capacity: usize,
    ) -> Result<Device> {
        let mut opts = options(broker, id);
        opts.set_clean_session(false);
        Self::start(broker, id, opts, capacity).await
    }

    async fn start(
        broker: SocketAddr,
        id: &str,
        mut opts: MqttOptions,
        capacity: usize,
    ) -> Result<Device> {
        opts.set_inflight(1000);
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, capacity);
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let eventloop = connected(broker, id, |tx| {
            let mut tx = Some(tx);
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        })
        .await?;
        Ok(Device {
            client,
            sent,
            eventloop,
        })
    }

    /// Queues a publish (it is written when the event loop gets to it).
    pub async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) -> Result<()> {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .map_err(|e| anyhow!("publish to {topic}: {e}"))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.eventloop.abort();
    }
}

/// A QoS 1 device that knows exactly which of its publishes were PUBACKed:
/// each publish carries a caller-chosen id, and the ids of acked publishes
/// arrive in ack order ([`AckedDevice::next_ack`], [`AckedDevice::acked`]).
///
/// Its event loop ends at the first connection error and never reconnects:
/// a reconnect would replay unacked messages behind the caller's back, and
/// a missing PUBACK is what the callers check for. Dropping it stops the loop.
pub struct AckedDevice {
    client: AsyncClient,
    /// Ids of the publishes handed to the client and not yet written, in order.
    queued: Arc<Mutex<VecDeque<u64>>>,
    acks: mpsc::UnboundedReceiver<u64>,
    acked: BTreeSet<u64>,
    eventloop: tokio::task::JoinHandle<()>,
}

impl AckedDevice {
    /// Connects `id` to `broker`; waits for CONNACK.
    pub async fn connect(broker: SocketAddr, id: &str) -> Result<AckedDevice> {
        let (client, eventloop) = AsyncClient::new(options(broker, id), 10);
        let queued = Arc::new(Mutex::new(VecDeque::new()));
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let written = queued.clone();
        let eventloop = connected(broker, id, |tx| {
            tokio::spawn(track_acks(eventloop, tx, written, ack_tx))
        })
        .await?;
        Ok(AckedDevice {
            client,
            queued,
            acks,
            acked: BTreeSet::new(),
            eventloop,
        })
    }

    /// Publishes `payload` at QoS 1 as message `id` (returns once rumqttc
    /// has it queued; the PUBACK comes later).
    pub async fn publish(
        &mut self,
        topic: &str,
        id: u64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<()> {
        // `&mut self` keeps the id queue and rumqttc's request queue in the same order.
        lock(&self.queued).push_back(id);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| anyhow!("publish to {topic}: {e}"))
    }

    /// Waits for the next PUBACK; returns the acked message's id.
    pub async fn next_ack(&mut self, timeout: Duration) -> Result<u64> {
        match tokio::time::timeout(timeout, self.acks.recv()).await {
            Ok(Some(id)) => {
                self.acked.insert(id);
                Ok(id)
            }
            Ok(None) => Err(anyhow!("connection to the gateway lost")),
            Err(_) => Err(anyhow!("no PUBACK within {timeout:?}")),
        }
    }

    /// Every id acked so far (without waiting).
    pub fn acked(&mut self) -> &BTreeSet<u64> {
        while let Ok(id) = self.acks.try_recv() {
            self.acked.insert(id);
        }
        &self.acked
    }

    /// Whether the event loop is still connected (it never reconnects).
    pub fn is_connected(&self) -> bool {
        !self.eventloop.is_finished()
    }
}

impl Drop for AckedDevice {
    fn drop(&mut self) {
        self.eventloop.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drives an [`AckedDevice`]'s event loop: rumqttc handles publish requests
/// in order and reports each as `Outgoing::Publish(pkid)` when it writes it
/// (after an ack frees the pkid, if it collided), so the queued ids map onto
/// packet ids in that order; a PUBACK then names the message it acks.
async fn track_acks(
    mut eventloop: EventLoop,
    connack: oneshot::Sender<()>,
    queued: Arc<Mutex<VecDeque<u64>>>,
    acks: mpsc::UnboundedSender<u64>,
) {
    let mut connack = Some(connack);
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connack.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(id) = lock(&queued).pop_front() {
                    in_flight.insert(pkid, id);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(id) = in_flight.remove(&ack.pkid) {
                    let _ = acks.send(id);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
