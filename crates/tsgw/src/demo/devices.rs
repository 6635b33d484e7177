//! The demo's simulated devices and the printer of what reaches "ThingSpeak".

use std::future::{ready, Future};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use thingspeak::ChannelId;
use thingspeak_emulator::EmulatorHandle;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::{SerialPort, SerialStream};
use tokio_util::sync::CancellationToken;

use super::MQTT_CHANNEL;

const SEND_EVERY: Duration = Duration::from_secs(2);

/// A pseudo-terminal pair: the demo writes to the master like an Arduino
/// would; the gateway opens the slave path like `/dev/ttyACM0`.
pub struct SerialDevice {
    master: SerialStream,
    /// Held open so the slave keeps its settings between the gateway's opens.
    _slave: SerialStream,
    pub path: PathBuf,
}

impl SerialDevice {
    pub fn open() -> anyhow::Result<Self> {
        let (master, slave) = SerialStream::pair().context("cannot create a pty pair")?;
        let path = PathBuf::from(slave.name().context("the pty has no path")?);
        Ok(Self {
            master,
            _slave: slave,
            path,
        })
    }
}

/// A Modbus TCP "PLC" whose holding register 0 holds a temperature in tenths
/// of °C, and register 1 the setpoint the gateway writes (downlink).
pub struct ModbusDevice {
    pub addr: SocketAddr,
    temperature_tenths: Arc<AtomicU16>,
    _server: JoinHandle<()>,
}

#[derive(Clone)]
struct Plc {
    temperature_tenths: Arc<AtomicU16>,
    setpoint_tenths: Arc<AtomicU16>,
}

impl Service for Plc {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let answer = match req.request {
            Request::ReadHoldingRegisters(0, 1) => Ok(Response::ReadHoldingRegisters(vec![self
                .temperature_tenths
                .load(Ordering::Relaxed)])),
            // The gateway reads the setpoint back after writing it.
            Request::ReadHoldingRegisters(1, 1) => Ok(Response::ReadHoldingRegisters(vec![self
                .setpoint_tenths
                .load(Ordering::Relaxed)])),
            Request::WriteSingleRegister(1, value) => {
                self.setpoint_tenths.store(value, Ordering::Relaxed);
                println!(
                    "  device  plc            ← holding register 1 = {value} (setpoint {:.1} °C, written by the gateway)",
                    f64::from(value as i16) / 10.0
                );
                Ok(Response::WriteSingleRegister(1, value))
            }
            Request::ReadHoldingRegisters(..) => Err(ExceptionCode::IllegalDataAddress),
            _ => Err(ExceptionCode::IllegalFunction),
        };
        Box::pin(ready(answer))
    }
}

impl ModbusDevice {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let temperature_tenths = Arc::new(AtomicU16::new(215));
        let plc = Plc {
            temperature_tenths: temperature_tenths.clone(),
            setpoint_tenths: Arc::new(AtomicU16::new(200)),
        };
        let server = tokio::spawn(async move {
            let on_connected = move |stream, peer| {
                let plc = plc.clone();
                async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(plc.clone()))) }
            };
            let _ = Server::new(listener).serve(&on_connected, |_err| {}).await;
        });
        Ok(Self {
            addr,
            temperature_tenths,
            _server: server,
        })
    }
}

pub async fn spawn_all(
    mqtt: SocketAddr,
    serial: SerialDevice,
    modbus: ModbusDevice,
    stop: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();

    let esp = mqtt_client("esp-kitchen", mqtt, &mut tasks, &stop);
    tasks.push(every(SEND_EVERY, stop.clone(), move |i| {
        let esp = esp.clone();
        async move {
            let topic = format!("channels/{MQTT_CHANNEL}/publish");
            let payload = format!(
                "field1={:.1}&field2={}",
                21.0 + (i % 10) as f64 / 10.0,
                40 + i % 5
            );
            println!("  device  esp-kitchen    → {topic}  {payload}");
            let _ = esp.publish(topic, QoS::AtLeastOnce, false, payload).await;
        }
    }));

    let garden = mqtt_client("garden-sensor", mqtt, &mut tasks, &stop);
    tasks.push(every(SEND_EVERY, stop.clone(), move |i| {
        let garden = garden.clone();
        async move {
            let payload = format!(
                r#"{{"soil":{},"light":{}}}"#,
                30 + i % 7,
                800 + 10 * (i % 4)
            );
            println!("  device  garden-sensor  → garden/bed-1/climate  {payload}");
            let _ = garden
                .publish("garden/bed-1/climate", QoS::AtLeastOnce, false, payload)
                .await;
        }
    }));

    let serial = Arc::new(tokio::sync::Mutex::new(serial));
    tasks.push(every(SEND_EVERY, stop.clone(), move |i| {
        let serial = serial.clone();
        async move {
            let line = format!("t={:.1},h={}\r\n", 19.5 + (i % 6) as f64 / 2.0, 55 + i % 3);
            println!("  device  arduino        → serial  {}", line.trim_end());
            let mut device = serial.lock().await;
            let _ = device.master.write_all(line.as_bytes()).await;
        }
    }));

    let temperature = modbus.temperature_tenths.clone();
    tasks.push(every(SEND_EVERY, stop.clone(), move |i| {
        let value = 200 + (i % 20) as u16;
        temperature.store(value, Ordering::Relaxed);
        println!("  device  plc            → holding register 0 = {value} (tenths of °C)");
        ready(())
    }));
    // The server task must live as long as the demo.
    tasks.push(tokio::spawn(async move {
        let _modbus = modbus;
        stop.cancelled().await;
    }));
    Ok(tasks)
}

/// Someone writes a setpoint to the control channel from the cloud (the web
/// UI, a MATLAB analysis), as ThingSpeak's REST `update.json` would store it;
/// every third one is out of the rule's range, to show the refusal.
pub fn spawn_cloud_setpoints(
    emulator: Arc<EmulatorHandle>,
    channel: ChannelId,
    stop: CancellationToken,
) -> JoinHandle<()> {
    every(Duration::from_secs(7), stop, move |i| {
        let emulator = emulator.clone();
        async move {
            let value = if i % 3 == 2 {
                "45.0".to_owned()
            } else {
                format!("{:.1}", 19.0 + (i % 5) as f64 * 0.5)
            };
            let mut update = thingspeak::ChannelUpdate::new();
            update.set(
                thingspeak::Target::Field(thingspeak::Field::new(1).expect("field 1")),
                value.clone(),
            );
            match emulator.write(channel, &update) {
                Ok(entry) => println!(
                    "CLOUD      channel {channel} entry {:>3}  setpoint field1={value} (written over REST, as from the web UI)",
                    entry.entry_id()
                ),
                Err(e) => println!("CLOUD      setpoint {value} not stored: {e}"),
            }
        }
    })
}

fn mqtt_client(
    id: &str,
    broker: SocketAddr,
    tasks: &mut Vec<JoinHandle<()>>,
    stop: &CancellationToken,
) -> AsyncClient {
    let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let stop = stop.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = eventloop.poll() => if event.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                },
            }
        }
    }));
    client
}

/// Calls `f(0)`, `f(1)`, ... every `period` until `stop`.
fn every<F, Fut>(period: Duration, stop: CancellationToken, mut f: F) -> JoinHandle<()>
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        for i in 0.. {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => f(i).await,
            }
        }
    })
}

/// Prints every new entry the emulator stored, as a ThingSpeak channel view would show it.
pub async fn print_entries(
    emulator: Arc<EmulatorHandle>,
    channels: Vec<ChannelId>,
    stop: CancellationToken,
) {
    let mut seen = vec![0usize; channels.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (i, channel) in channels.iter().enumerate() {
            let entries = emulator.entries(*channel);
            for entry in entries.iter().skip(seen[i]) {
                let values: Vec<String> = thingspeak::payload::all_targets()
                    .filter_map(|t| entry.get(t).map(|v| format!("{t}={v}")))
                    .collect();
                println!(
                    "THINGSPEAK channel {channel} entry {:>3}  {}  {}",
                    entry.entry_id(),
                    entry.created_at().format("%H:%M:%S"),
                    values.join(" ")
                );
            }
            seen[i] = entries.len();
        }
    }
}
