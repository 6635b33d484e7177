//! Serial and Modbus devices through the real gateway to the emulator.

use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::{SerialPort, SerialStream};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arduino_on_a_serial_line_reaches_thingspeak() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty path");
    let serial = format!(
        r#"
[[serial]]
name = "arduino"
path = {path:?}
channel = 1002
exclusive = false
parser = {{ format = "key_value", fields = {{ t = "field1", h = "field2" }} }}
"#
    );
    let config = write_config(
        dir.path(),
        &config_toml(&emulator, dir.path(), 1.0, &serial),
    );
    let gateway = Gateway::start(&config);

    // The port opens asynchronously; keep printing until the values arrive.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        master.write_all(b"t=21.5,h=40\r\n").await.unwrap();
        let got = delivered(&emulator);
        if got
            .get(&(1002, "field1".into()))
            .is_some_and(|v| v.contains(&"21.5".into()))
            && got
                .get(&(1002, "field2".into()))
                .is_some_and(|v| v.contains(&"40".into()))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serial values never arrived: {got:?}\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let accepted = gateway
        .metric(r#"tsgw_readings_total{device="arduino",result="accepted",source="serial"}"#)
        .await;
    assert!(accepted >= 2.0, "{accepted}");
    drop(slave);
}

/// A PLC whose holding register 10 holds tenths of a degree.
#[derive(Clone)]
struct Plc(Arc<AtomicU16>);

impl Service for Plc {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        Box::pin(ready(match req.request {
            Request::ReadHoldingRegisters(10, 1) => Ok(Response::ReadHoldingRegisters(vec![self
                .0
                .load(Ordering::Relaxed)])),
            _ => Err(ExceptionCode::IllegalDataAddress),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_tcp_plc_reaches_thingspeak() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let plc = Plc(Arc::new(AtomicU16::new(-125i16 as u16)));
    let server_plc = plc.clone();
    tokio::spawn(async move {
        let on_connected = move |stream, peer| {
            let plc = server_plc.clone();
            async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(plc.clone()))) }
        };
        let _ = Server::new(listener).serve(&on_connected, |_| {}).await;
    });
    let modbus = format!(
        r#"
[[modbus]]
name = "plc"
unit_id = 1
channel = 1003
poll_interval_ms = 200
timeout_ms = 500
retries = 1
max_gap = 0
transport.tcp.address = "{addr}"
points = [
  {{ name = "temperature", kind = "holding", address = 10, type = "i16", scale = 0.1, target = "field4" }},
]
"#
    );
    let config = write_config(
        dir.path(),
        &config_toml(&emulator, dir.path(), 1.0, &modbus),
    );
    let gateway = Gateway::start(&config);
    wait_for_delivery(&emulator, "-12.5 from the PLC", |got| {
        got.get(&(1003, "field4".into()))
            .is_some_and(|v| v.contains(&"-12.5".into()))
    })
    .await;
    plc.0.store(301, Ordering::Relaxed);
    wait_for_delivery(&emulator, "30.1 from the PLC", |got| {
        got.get(&(1003, "field4".into()))
            .is_some_and(|v| v.contains(&"30.1".into()))
    })
    .await;
    assert_eq!(emulator.counters().dropped_rate_limit, 0);
    drop(gateway);
}
