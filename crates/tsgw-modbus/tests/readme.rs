//! The README's worked example is real config: it parses, validates and spawns.

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::Metrics;
use tsgw_modbus::{spawn_devices, DataType, ModbusDeviceConfig, ModbusTransport, WordOrder};

/// The gateway config's shape for Modbus: `[[modbus]]` tables, one per device.
#[derive(Deserialize)]
struct Gateway {
    modbus: Vec<ModbusDeviceConfig>,
}

fn readme_example() -> Vec<ModbusDeviceConfig> {
    let readme = include_str!("../README.md");
    let start = readme.find("```toml\n").expect("README has a toml block") + "```toml\n".len();
    let len = readme[start..].find("```").expect("toml block ends");
    let gateway: Gateway = toml::from_str(&readme[start..start + len]).expect("README toml parses");
    gateway.modbus
}

#[test]
fn the_readme_example_is_valid_config() {
    let devices = readme_example();
    assert_eq!(devices.len(), 3);
    for d in &devices {
        d.validate().unwrap();
    }
    let meter = &devices[0];
    assert!(matches!(&meter.transport, ModbusTransport::Rtu(r) if r.path == "/dev/ttyUSB0"));
    let addresses: Vec<u16> = meter.points.iter().map(|p| p.address).collect();
    assert_eq!(addresses, [0, 6, 12]);
    assert!(meter
        .points
        .iter()
        .all(|p| p.data_type == DataType::F32 && p.order == WordOrder::CDAB));
    // The three floats are fetched in one request.
    assert_eq!(
        tsgw_modbus::plan::plan_reads(&meter.points, meter.max_gap).len(),
        1
    );
    let plc = &devices[2];
    assert!(matches!(&plc.transport, ModbusTransport::Tcp(t) if t.address == "192.168.1.20:502"));
    assert_eq!(plc.points[0].data_type, DataType::I16);
    assert_eq!(plc.points[0].scale, 0.1);
}

#[tokio::test]
async fn the_readme_example_spawns_one_task_per_bus() {
    let (tx, _rx) = mpsc::channel(8);
    // Cancelled before the start, so the tasks exit without touching the example's
    // serial port or PLC address.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let tasks = spawn_devices(&readme_example(), tx, Metrics::new(), shutdown.clone()).unwrap();
    // Two meters on /dev/ttyUSB0 share a bus; the PLC has its own.
    assert_eq!(tasks.len(), 2);
    for t in tasks {
        tokio::time::timeout(std::time::Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
    }
}
