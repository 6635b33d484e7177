//! One-shot reads (`tsgw probe modbus`, `tsgw check-config --test`) against
//! the simulator.

mod sim;

use std::time::Duration;

use sim::{Sim, TcpSim};
use tokio_modbus::ExceptionCode;
use tsgw_core::Value;
use tsgw_modbus::decode::BlockData;
use tsgw_modbus::once::{poll_once, read_block, ReadError};
use tsgw_modbus::{ModbusDeviceConfig, ModbusTransport, RegisterKind, TcpConfig};

fn tcp(addr: std::net::SocketAddr) -> ModbusTransport {
    ModbusTransport::Tcp(TcpConfig {
        address: addr.to_string(),
    })
}

const TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_block_is_read_raw_and_failures_are_named() {
    let sim = Sim::new();
    sim.set_holding(1, 10, &[0xE979, 0x42F6, 0xFF38]);
    sim.make_silent(2);
    sim.set_exception(3, ExceptionCode::IllegalDataAddress);
    let server = TcpSim::start(sim, "127.0.0.1:0".parse().unwrap()).await;
    let t = tcp(server.addr);

    let data = read_block(&t, 1, RegisterKind::Holding, 10, 3, TIMEOUT)
        .await
        .unwrap();
    assert_eq!(data, BlockData::Registers(vec![0xE979, 0x42F6, 0xFF38]));

    let silent = read_block(&t, 2, RegisterKind::Holding, 10, 3, TIMEOUT).await;
    assert_eq!(silent, Err(ReadError::Timeout(TIMEOUT)));

    let refused = read_block(&t, 3, RegisterKind::Holding, 10, 3, TIMEOUT)
        .await
        .unwrap_err();
    let text = refused.to_string();
    assert!(
        text.contains("0x02") && text.contains("IllegalDataAddress"),
        "{text}"
    );
    server.stop().await;

    let closed = read_block(&t, 1, RegisterKind::Holding, 10, 3, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(closed, ReadError::Open { .. }), "{closed:?}");
}

fn device(name: &str, addr: std::net::SocketAddr, unit: u8) -> ModbusDeviceConfig {
    toml::from_str(&format!(
        r#"
        name = "{name}"
        unit_id = {unit}
        channel = 100
        timeout_ms = 300
        retries = 1
        transport.tcp.address = "{addr}"
        points = [
            {{ kind = "holding", address = 10, type = "f32", order = "CDAB", target = "field1" }},
            {{ kind = "holding", address = 12, type = "i16", scale = 0.1, target = "field2" }},
        ]
        "#
    ))
    .unwrap()
}

#[tokio::test]
async fn one_poll_cycle_returns_the_readings_the_gateway_would_queue() {
    let sim = Sim::new();
    // 123.456f32 = 0x42F6E979, low word first (CDAB); -200 as i16.
    sim.set_holding(1, 10, &[0xE979, 0x42F6, 0xFF38]);
    sim.make_silent(2);
    let server = TcpSim::start(sim.clone(), "127.0.0.1:0".parse().unwrap()).await;

    let report = poll_once(&device("meter", server.addr, 1)).await.unwrap();
    assert!(report.answered);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let values: Vec<Value> = report.readings.iter().map(|r| r.value.clone()).collect();
    assert_eq!(
        values,
        vec![Value::Number(f64::from(123.456f32)), Value::Number(-20.0)]
    );
    assert!(report.readings.iter().all(|r| r.origin.device == "meter"));

    let report = poll_once(&device("dead", server.addr, 2)).await.unwrap();
    assert!(!report.answered);
    assert!(report.readings.is_empty());
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("timeout"),
        "{:?}",
        report.problems
    );
    // Retries as configured: two attempts.
    assert_eq!(sim.requests(2), 2);
    server.stop().await;
}
