//! The connection lifecycle: connecting with a fresh rumqttc event loop,
//! coming up, losing it (backoff, refusals, idle closes), giving up on a stuck
//! write, renewing an idle connection, and saying DISCONNECT at shutdown.

use std::time::Duration;

use rand::Rng;
use rumqttc::AsyncClient;
use tokio::time::Instant;

use crate::connection::{mqtt_options, CONNECT_TIMEOUT_SECS, REQUEST_CHANNEL_CAPACITY};
use crate::driver::{drive, Closed, ConnEvent, ConnEventKind};
use crate::error::ForwarderError;

use super::confirm::Stage;
use super::{Conn, Forwarder};

/// A connection up this long is stable: the backoff starts over after it drops.
pub(super) const STABLE_AFTER: Duration = Duration::from_secs(30);

/// A publish not written within this time means the connection is stuck.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(2 * CONNECT_TIMEOUT_SECS);

/// Time allowed to say DISCONNECT at shutdown.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

impl Forwarder {
    /// Starts a connection attempt with a fresh rumqttc event loop.
    pub(super) fn connect(&mut self) -> Result<(), ForwarderError> {
        let options = mqtt_options(&self.config, self.tls.clone())?;
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        eventloop.set_network_options(network);
        let generation = self.next_generation;
        self.next_generation += 1;
        tracing::debug!(connection = %self.connection, generation, "connecting upstream");
        let task = tokio::spawn(drive(eventloop, generation, self.events_tx.clone()));
        self.conn = Conn::Connecting {
            generation,
            client,
            task,
        };
        Ok(())
    }

    pub(super) fn current_generation(&self) -> Option<u64> {
        match &self.conn {
            Conn::Down { .. } => None,
            Conn::Connecting { generation, .. } | Conn::Up { generation, .. } => Some(*generation),
        }
    }

    pub(super) fn on_connected(&mut self) {
        let conn = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        );
        self.conn = match conn {
            Conn::Connecting {
                generation,
                client,
                task,
            } => {
                let now = Instant::now();
                Conn::Up {
                    generation,
                    client,
                    task,
                    since: now,
                    last_publish: now,
                }
            }
            other => other,
        };
        self.refusal_reported = false;
        self.next_check.clear();
        tracing::info!(
            connection = %self.connection,
            transport = self.config.transport.as_str(),
            "connected to ThingSpeak"
        );
        self.metrics
            .upstream_connected
            .with_label_values(&[&self.connection])
            .set(1);
        self.metrics
            .upstream_connects_total
            .with_label_values(&[&self.connection])
            .inc();
    }

    pub(super) fn on_closed(&mut self, closed: Closed) {
        let now = Instant::now();
        let closing = self.current_generation();
        let conn = std::mem::replace(&mut self.conn, Conn::Down { retry_at: now });
        let (was_up_since, idle_close) = match conn {
            // The broker closing a connection we left idle past the renewal
            // point is expected (ThingSpeak's idle limit), not a fault.
            Conn::Up {
                since,
                last_publish,
                ..
            } => (
                Some(since),
                now.duration_since(last_publish) >= self.renew_idle_after,
            ),
            _ => (None, false),
        };
        // Failed attempts count too (reason refused, tls, connect_timeout...),
        // so a refusal loop is visible in metrics, not only in the log.
        self.metrics
            .upstream_disconnects_total
            .with_label_values(&[&self.connection, closed.reason])
            .inc();
        if let Some(since) = was_up_since {
            self.metrics
                .upstream_connected
                .with_label_values(&[&self.connection])
                .set(0);
            if now.duration_since(since) >= STABLE_AFTER {
                self.backoff.reset();
            }
        }
        if let Some(generation) = closing {
            self.poison_note_close(&closed, generation, now);
        }
        self.connection_lost(now);
        let jitter: f64 = rand::thread_rng().gen();
        let delay = if closed.is_auth_refusal() {
            if !self.refusal_reported {
                self.refusal_reported = true;
                tracing::error!(
                    connection = %self.connection,
                    client_id = %self.config.client_id,
                    username = %self.config.username,
                    error = %closed.message,
                    "ThingSpeak refused the connection: check the MQTT device's client id, \
                     username and password, and that the device is authorised for the \
                     channels; retrying slowly"
                );
            }
            self.backoff.max_delay(jitter)
        } else if idle_close {
            self.backoff.reset();
            self.backoff.next_delay(jitter)
        } else {
            self.backoff.next_delay(jitter)
        };
        if idle_close {
            tracing::info!(
                connection = %self.connection,
                reason = closed.reason,
                retry_in_secs = delay.as_secs_f64(),
                "idle upstream connection closed by the broker (idle limit); reconnecting"
            );
        } else if was_up_since.is_some() {
            tracing::warn!(
                connection = %self.connection,
                reason = closed.reason,
                error = %closed.message,
                retry_in_secs = delay.as_secs_f64(),
                "upstream connection lost"
            );
        } else if closed.is_auth_refusal() {
            tracing::debug!(
                connection = %self.connection,
                error = %closed.message,
                retry_in_secs = delay.as_secs_f64(),
                "connection refused again"
            );
        } else {
            tracing::warn!(
                connection = %self.connection,
                reason = closed.reason,
                error = %closed.message,
                retry_in_secs = delay.as_secs_f64(),
                "could not connect upstream"
            );
        }
        self.conn = Conn::Down {
            retry_at: now + delay,
        };
    }

    /// Bookkeeping when a connection ends for whatever reason: subscriptions
    /// are gone, and updates written on it are in doubt until checked.
    pub(super) fn connection_lost(&mut self, now: Instant) {
        if let Some(feeds) = &self.feeds {
            feeds.connection_down();
        }
        self.doubts_lose_connection();
        self.subs.clear();
        self.sub_order.clear();
        self.sub_pkids.clear();
        self.next_check.clear();
        if let Some(in_flight) = self.in_flight.take() {
            // The update may or may not have left: count it against the
            // channel's interval.
            self.schedule.record(in_flight.channel, now);
            tracing::info!(
                channel = %in_flight.channel,
                "connection lost before the update was written; it will be checked and resent"
            );
        }
        let confirm = self.config.confirm;
        for (channel, p) in self.pending.iter_mut() {
            let confirms = confirm && !self.unconfirmable.contains(channel);
            p.stage = match p.stage {
                // Resending without confirmation is safe: a copy that did
                // arrive makes ThingSpeak reject the resend's created_at.
                _ if !confirms => Stage::Ready,
                Stage::Ready => Stage::Ready,
                Stage::Writing | Stage::AwaitEcho { .. } | Stage::Probe { .. } | Stage::InDoubt => {
                    // Handed to (or written on) a connection that is gone:
                    // ThingSpeak may have stored it without our seeing the
                    // echo, so it is settled by evidence and never gets a
                    // fresh created_at (that would store its readings twice).
                    p.maybe_stored = true;
                    Stage::InDoubt
                }
            };
        }
    }

    /// Gives up on a connection that has not written an update in time.
    pub(super) fn check_write_timeout(&mut self, now: Instant) {
        let stuck = matches!(
            (&self.in_flight, &self.conn),
            (Some(f), Conn::Up { .. }) if now.duration_since(f.issued) >= WRITE_TIMEOUT
        );
        if stuck {
            if let Conn::Up { task, .. } = &self.conn {
                task.abort();
            }
            self.on_closed(Closed {
                reason: "write_timeout",
                refused: None,
                message: format!("update not written within {WRITE_TIMEOUT:?}"),
            });
        }
    }

    /// Replaces an idle connection ThingSpeak may be about to close by a fresh
    /// one (connected at once, without backoff). The readings stay queued.
    pub(super) fn renew_connection(&mut self, now: Instant) {
        let conn = std::mem::replace(&mut self.conn, Conn::Down { retry_at: now });
        if let Conn::Up { task, .. } = conn {
            task.abort();
            tracing::info!(
                connection = %self.connection,
                "renewing a connection idle for {:.0} s before publishing",
                self.renew_idle_after.as_secs_f64()
            );
            self.metrics
                .upstream_connected
                .with_label_values(&[&self.connection])
                .set(0);
            self.metrics
                .upstream_disconnects_total
                .with_label_values(&[&self.connection, "renew_idle"])
                .inc();
        }
        self.connection_lost(now);
    }

    /// Says DISCONNECT if connected, letting an in-flight write finish.
    pub(super) async fn shut_down(mut self) {
        let conn = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        );
        match conn {
            Conn::Up {
                generation,
                client,
                task,
                ..
            } => {
                let _ = client.try_disconnect();
                let deadline = Instant::now() + SHUTDOWN_GRACE;
                loop {
                    let event = tokio::time::timeout_at(deadline, self.events_rx.recv()).await;
                    match event {
                        Ok(Some(ConnEvent {
                            generation: g,
                            kind: ConnEventKind::Written,
                        })) if g == generation => {
                            // Counted; with confirmation the readings stay
                            // queued (no echo can come now) and the next run
                            // finds the entry when it checks.
                            if let Some(f) = self.in_flight.take() {
                                self.written(f.channel, f.generation, Instant::now());
                            }
                        }
                        Ok(Some(ConnEvent {
                            kind: ConnEventKind::Closed(_),
                            generation: g,
                        })) if g == generation => break,
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                task.abort();
                self.metrics
                    .upstream_disconnects_total
                    .with_label_values(&[&self.connection, "shutdown"])
                    .inc();
            }
            Conn::Connecting { task, .. } => task.abort(),
            Conn::Down { .. } => {}
        }
        self.metrics
            .upstream_connected
            .with_label_values(&[&self.connection])
            .set(0);
        tracing::info!(connection = %self.connection, "forwarder stopped");
    }
}
