//! Raw MQTT writers: rumqttc's packet codec over a plain blocking socket.
//! They count exactly what they wrote (a client library may still hold
//! messages when it reports them sent) and cost the machine little, so a
//! burst measures the broker.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Publish};
use rumqttc::mqttbytes::QoS;

/// Connects a client `id` (keep-alive 60 s) and waits up to `wait` for an
/// accepting CONNACK; later reads on the socket time out after `wait` too.
pub fn raw_connect(broker: SocketAddr, id: &str, wait: Duration) -> Result<TcpStream> {
    let mut socket = TcpStream::connect(broker).with_context(|| format!("connect {broker}"))?;
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(wait))?;
    let mut buf = BytesMut::new();
    let mut connect = Connect::new(id);
    connect.keep_alive = 60;
    connect.write(&mut buf)?;
    socket.write_all(&buf)?;
    let mut connack = [0u8; 4];
    socket
        .read_exact(&mut connack)
        .with_context(|| format!("{id}: no CONNACK"))?;
    if connack != [0x20, 2, 0, 0] {
        bail!("{id}: CONNACK {connack:?}");
    }
    Ok(socket)
}

/// `per_client` QoS 0 publishes `field1=<n>` to `topic` from each of
/// `clients` connections at once, as fast as the sockets take them, then
/// DISCONNECT; returns once the broker closed every connection (it has read
/// everything then). Every publish was written before the DISCONNECT.
pub fn qos0_burst(
    broker: SocketAddr,
    topic: &str,
    clients: usize,
    per_client: usize,
    wait: Duration,
) -> Result<()> {
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let topic = topic.to_owned();
            std::thread::spawn(move || -> Result<()> {
                let id = format!("burst-{c}");
                let mut socket = raw_connect(broker, &id, wait)?;
                let mut buf = BytesMut::with_capacity(80 * 1024);
                for n in 0..per_client {
                    Publish::new(&topic, QoS::AtMostOnce, format!("field1={n}")).write(&mut buf)?;
                    if buf.len() > 64 * 1024 {
                        socket
                            .write_all(&buf)
                            .with_context(|| format!("{id}: the broker stopped reading"))?;
                        buf.clear();
                    }
                }
                buf.extend_from_slice(&[0xe0, 0]); // DISCONNECT
                socket
                    .write_all(&buf)
                    .with_context(|| format!("{id}: the broker stopped reading"))?;
                let mut rest = Vec::new();
                socket
                    .read_to_end(&mut rest)
                    .with_context(|| format!("{id}: the broker did not close within {wait:?}"))?;
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a burst writer panicked"))??;
    }
    Ok(())
}
