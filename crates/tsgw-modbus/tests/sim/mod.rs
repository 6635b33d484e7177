//! A Modbus device simulator for the integration tests, built on tokio-modbus's
//! own server (`tcp-server`, `rtu-server`): register maps per unit id, units that
//! never answer, "illegal data address" for unmapped addresses, and a counter of
//! the requests each unit received.
#![allow(dead_code)] // each test file uses a different part of it

use std::collections::{HashMap, HashSet};
use std::future::{ready, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server as TcpServer};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_serial::{SerialPort, SerialStream};
use tsgw_core::{Metrics, Reading};

#[derive(Default)]
struct State {
    holding: HashMap<(u8, u16), u16>,
    input: HashMap<(u8, u16), u16>,
    coils: HashMap<(u8, u16), bool>,
    discrete: HashMap<(u8, u16), bool>,
    silent: HashSet<u8>,
    delays: HashMap<u8, Duration>,
    exceptions: HashMap<u8, ExceptionCode>,
    requests: HashMap<u8, usize>,
    /// Holding registers that acknowledge writes but keep their value (a
    /// PLC clamping or ignoring a setpoint).
    write_protected: HashSet<(u8, u16)>,
    /// Arrival time and unit of every request, in order.
    log: Vec<(tokio::time::Instant, u8)>,
}

/// Shared, cloneable simulator state; every clone serves the same registers.
#[derive(Clone, Default)]
pub struct Sim(Arc<Mutex<State>>);

impl Sim {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    pub fn set_holding(&self, unit: u8, start: u16, words: &[u16]) {
        let mut st = self.state();
        for (i, w) in words.iter().enumerate() {
            st.holding.insert((unit, start + i as u16), *w);
        }
    }

    pub fn set_input(&self, unit: u8, start: u16, words: &[u16]) {
        let mut st = self.state();
        for (i, w) in words.iter().enumerate() {
            st.input.insert((unit, start + i as u16), *w);
        }
    }

    pub fn set_coils(&self, unit: u8, start: u16, bits: &[bool]) {
        let mut st = self.state();
        for (i, b) in bits.iter().enumerate() {
            st.coils.insert((unit, start + i as u16), *b);
        }
    }

    pub fn set_discrete(&self, unit: u8, start: u16, bits: &[bool]) {
        let mut st = self.state();
        for (i, b) in bits.iter().enumerate() {
            st.discrete.insert((unit, start + i as u16), *b);
        }
    }

    /// The unit receives requests (they are counted) but never answers.
    pub fn make_silent(&self, unit: u8) {
        self.state().silent.insert(unit);
    }

    /// The unit answers, but only after `delay` (and, like a real half-duplex bus,
    /// the simulator serves nobody else meanwhile).
    pub fn set_delay(&self, unit: u8, delay: Duration) {
        self.state().delays.insert(unit, delay);
    }

    /// The unit answers every request with `code`.
    pub fn set_exception(&self, unit: u8, code: ExceptionCode) {
        self.state().exceptions.insert(unit, code);
    }

    /// Every request so far: when it arrived and for which unit.
    pub fn request_log(&self) -> Vec<(tokio::time::Instant, u8)> {
        self.state().log.clone()
    }

    /// Requests received for `unit` so far.
    pub fn protect_holding(&self, unit: u8, addr: u16) {
        self.state().write_protected.insert((unit, addr));
    }

    pub fn holding(&self, unit: u8, addr: u16) -> Option<u16> {
        self.state().holding.get(&(unit, addr)).copied()
    }

    pub fn coil(&self, unit: u8, addr: u16) -> Option<bool> {
        self.state().coils.get(&(unit, addr)).copied()
    }

    pub fn requests(&self, unit: u8) -> usize {
        self.state().requests.get(&unit).copied().unwrap_or(0)
    }
}

fn read<T: Copy>(
    map: &HashMap<(u8, u16), T>,
    unit: u8,
    addr: u16,
    cnt: u16,
) -> Result<Vec<T>, ExceptionCode> {
    (0..cnt)
        .map(|i| {
            addr.checked_add(i)
                .and_then(|a| map.get(&(unit, a)).copied())
                .ok_or(ExceptionCode::IllegalDataAddress)
        })
        .collect()
}

impl Service for Sim {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Option<Response>, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let unit = req.slave;
        let answer = self.answer(req);
        match self.state().delays.get(&unit).copied() {
            Some(delay) => Box::pin(async move {
                tokio::time::sleep(delay).await;
                answer
            }),
            None => Box::pin(ready(answer)),
        }
    }
}

impl Sim {
    fn answer(&self, req: SlaveRequest<'static>) -> Result<Option<Response>, ExceptionCode> {
        let mut st = self.state();
        let unit = req.slave;
        *st.requests.entry(unit).or_default() += 1;
        st.log.push((tokio::time::Instant::now(), unit));
        if st.silent.contains(&unit) {
            return Ok(None);
        }
        if let Some(code) = st.exceptions.get(&unit) {
            return Err(*code);
        }
        let result = match req.request {
            Request::ReadHoldingRegisters(a, n) => {
                read(&st.holding, unit, a, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(a, n) => {
                read(&st.input, unit, a, n).map(Response::ReadInputRegisters)
            }
            Request::ReadCoils(a, n) => read(&st.coils, unit, a, n).map(Response::ReadCoils),
            Request::ReadDiscreteInputs(a, n) => {
                read(&st.discrete, unit, a, n).map(Response::ReadDiscreteInputs)
            }
            Request::WriteSingleRegister(a, w) => {
                if !st.write_protected.contains(&(unit, a)) {
                    st.holding.insert((unit, a), w);
                }
                Ok(Response::WriteSingleRegister(a, w))
            }
            Request::WriteMultipleRegisters(a, words) => {
                for (i, w) in words.iter().enumerate() {
                    st.holding.insert((unit, a + i as u16), *w);
                }
                Ok(Response::WriteMultipleRegisters(a, words.len() as u16))
            }
            Request::WriteSingleCoil(a, v) if st.coils.contains_key(&(unit, a)) => {
                st.coils.insert((unit, a), v);
                Ok(Response::WriteSingleCoil(a, v))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        result.map(Some)
    }
}

/// A simulator listening on TCP until stopped (stopping closes its connections).
pub struct TcpSim {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TcpSim {
    /// Listens on `addr` (port 0 for any free port; a fixed port to restart in place).
    pub async fn start(sim: Sim, addr: SocketAddr) -> TcpSim {
        let socket = TcpSocket::new_v4().unwrap();
        // Restarting on the port of a just-stopped server must not fail on TIME_WAIT.
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let server = TcpServer::new(listener);
            let on_connected = move |stream, peer| {
                let sim = sim.clone();
                async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(sim.clone()))) }
            };
            let _ = server
                .serve_until(&on_connected, |_err| {}, async move {
                    let _ = stopped.await;
                })
                .await;
        });
        TcpSim {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .expect("simulator stops")
            .unwrap();
    }
}

/// A simulator on the master side of a pseudo terminal; devices open `path`.
pub struct RtuSim {
    pub path: String,
    /// Held open so the pty stays usable while devices open and close `path`.
    _slave: SerialStream,
    task: JoinHandle<()>,
}

impl RtuSim {
    pub fn start(sim: Sim) -> RtuSim {
        // The slave end from pair() holds no lock, so the device can open its path
        // exclusively (as it does on a real port).
        let (master, slave) = SerialStream::pair().expect("pty pair");
        let path = slave.name().expect("pty has a name");
        let server = tokio_modbus::server::rtu::Server::new(master);
        let task = tokio::spawn(async move {
            let _ = server.serve_forever(sim).await;
        });
        RtuSim {
            path,
            _slave: slave,
            task,
        }
    }
}

impl Drop for RtuSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Receives readings until `pred` holds for the collected list, or panics after `limit`.
pub async fn collect_until(
    rx: &mut mpsc::Receiver<Reading>,
    limit: Duration,
    mut pred: impl FnMut(&[Reading]) -> bool,
) -> Vec<Reading> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !pred(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(r)) => got.push(r),
            Ok(None) => panic!("readings channel closed"),
            Err(_) => panic!(
                "condition not met within {limit:?}; got {} readings: {got:?}",
                got.len()
            ),
        }
    }
    got
}

/// Waits until `pred` holds (polling), or panics after `limit`.
pub async fn wait_for(limit: Duration, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !pred() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn errors(metrics: &Metrics, device: &str, kind: &str) -> u64 {
    metrics
        .device_errors_total
        .with_label_values(&["modbus", device, kind])
        .get()
}

pub fn up(metrics: &Metrics, device: &str) -> i64 {
    metrics
        .device_up
        .with_label_values(&["modbus", device])
        .get()
}

pub fn accepted(metrics: &Metrics, device: &str) -> u64 {
    metrics
        .readings_total
        .with_label_values(&["modbus", device, "accepted"])
        .get()
}

pub fn parse_errors(metrics: &Metrics, device: &str, reason: &str) -> u64 {
    metrics
        .parse_errors_total
        .with_label_values(&["modbus", device, reason])
        .get()
}

/// The readings of one device, as (target, value) pairs.
pub fn values_of(readings: &[Reading], device: &str) -> Vec<(String, f64)> {
    readings
        .iter()
        .filter(|r| r.origin.device == device)
        .map(|r| (r.target.to_string(), r.value.as_f64().unwrap()))
        .collect()
}
