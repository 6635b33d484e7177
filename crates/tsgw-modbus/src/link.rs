//! The wire side: opening a TCP connection or serial port, and one read request
//! with a deadline, classified into what the poller needs to know.

use std::io;
use std::time::Duration;

use tokio::time::timeout;
use tokio_modbus::client::{rtu, tcp, Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response, Slave};

use crate::config::{ModbusTransport, Parity, RegisterKind, RtuConfig};
use crate::decode::BlockData;
use crate::fresh_input::FreshInput;
use crate::plan::ReadBlock;

/// Where a bus's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Tcp { address: String },
    Rtu(RtuConfig),
}

/// Why a request produced nothing. The names are the `kind` label of
/// `tsgw_device_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Timeout,
    /// An established TCP connection broke (reset, closed by the peer).
    Disconnect,
    /// The serial port or a TCP connect failed.
    Io,
    /// The answer was not a valid answer to our request.
    Decode,
    /// A gateway answered that the unit behind it does not respond (counted as an
    /// exception, handled like a timeout).
    Unreachable,
}

impl Failure {
    pub(crate) fn kind(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Disconnect => "disconnect",
            Failure::Io => "io",
            Failure::Decode => "decode",
            Failure::Unreachable => "exception",
        }
    }
}

/// The result of one read request.
#[derive(Debug)]
pub(crate) enum Outcome {
    Data(BlockData),
    Exception(ExceptionCode),
    Failed(Failure, String),
}

/// Exceptions by which a Modbus TCP gateway says the unit behind it is gone.
pub(crate) fn unit_unreachable(code: ExceptionCode) -> bool {
    matches!(
        code,
        ExceptionCode::GatewayPathUnavailable | ExceptionCode::GatewayTargetDevice
    )
}

impl From<&ModbusTransport> for Endpoint {
    fn from(transport: &ModbusTransport) -> Self {
        match transport {
            ModbusTransport::Tcp(tcp) => Endpoint::Tcp {
                address: tcp.address.clone(),
            },
            ModbusTransport::Rtu(rtu) => Endpoint::Rtu(rtu.clone()),
        }
    }
}

impl Endpoint {
    /// The TCP address or serial path, for logs.
    pub(crate) fn label(&self) -> &str {
        match self {
            Endpoint::Tcp { address } => address,
            Endpoint::Rtu(rtu) => &rtu.path,
        }
    }

    pub(crate) fn inter_frame_delay(&self) -> Duration {
        match self {
            Endpoint::Tcp { .. } => Duration::ZERO,
            Endpoint::Rtu(rtu) => Duration::from_millis(rtu.inter_frame_delay_ms),
        }
    }

    /// Whether the connection must be rebuilt after `failure`. A serial timeout is
    /// just a silent unit on a healthy bus; a TCP timeout leaves a late answer (and
    /// transaction ids) in flight, so a fresh connection is the clean way on.
    pub(crate) fn must_reopen_after(&self, failure: Failure) -> bool {
        match self {
            Endpoint::Tcp { .. } => true,
            Endpoint::Rtu(_) => failure != Failure::Timeout,
        }
    }

    /// Opens the connection or port; a TCP connect is bounded by `deadline`.
    pub(crate) async fn open(&self, deadline: Duration) -> io::Result<Context> {
        match self {
            Endpoint::Tcp { address } => {
                let stream = timeout(deadline, tokio::net::TcpStream::connect(address.as_str()))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                // Requests are tiny and latency-bound.
                stream.set_nodelay(true)?;
                Ok(tcp::attach_slave(stream, Slave::tcp_device()))
            }
            Endpoint::Rtu(cfg) => {
                let builder = tokio_serial::new(cfg.path.as_str(), cfg.baud)
                    .parity(match cfg.parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    })
                    .data_bits(match cfg.data_bits {
                        5 => tokio_serial::DataBits::Five,
                        6 => tokio_serial::DataBits::Six,
                        7 => tokio_serial::DataBits::Seven,
                        _ => tokio_serial::DataBits::Eight,
                    })
                    .stop_bits(if cfg.stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    })
                    .flow_control(tokio_serial::FlowControl::None);
                let port = tokio_serial::SerialStream::open(&builder).map_err(io::Error::from)?;
                Ok(rtu::attach_slave(
                    FreshInput::new(port, cfg.path.clone()),
                    Slave::broadcast(),
                ))
            }
        }
    }

    fn classify(&self, err: &io::Error) -> Failure {
        if err.kind() == io::ErrorKind::InvalidData {
            return Failure::Decode;
        }
        match self {
            Endpoint::Tcp { .. } => Failure::Disconnect,
            Endpoint::Rtu(_) => Failure::Io,
        }
    }

    /// Sends one request and waits at most `deadline` for the answer.
    pub(crate) async fn call(
        &self,
        ctx: &mut Context,
        request: Request<'_>,
        deadline: Duration,
    ) -> Result<Response, Outcome> {
        match timeout(deadline, ctx.call(request)).await {
            Err(_) => Err(Outcome::Failed(
                Failure::Timeout,
                format!("no answer within {deadline:?}"),
            )),
            Ok(Err(tokio_modbus::Error::Transport(err))) => {
                Err(Outcome::Failed(self.classify(&err), err.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Protocol(err))) => {
                Err(Outcome::Failed(Failure::Decode, err.to_string()))
            }
            Ok(Ok(Err(exception))) => Err(Outcome::Exception(exception)),
            Ok(Ok(Ok(response))) => Ok(response),
        }
    }

    /// Sends one read request for `block` and waits at most `deadline` for the answer.
    /// The answer is checked against the request (table, length) so that nothing a
    /// device sends can panic the poller.
    pub(crate) async fn read(
        &self,
        ctx: &mut Context,
        block: &ReadBlock,
        deadline: Duration,
    ) -> Outcome {
        let request = match block.kind {
            RegisterKind::Holding => Request::ReadHoldingRegisters(block.start, block.count),
            RegisterKind::Input => Request::ReadInputRegisters(block.start, block.count),
            RegisterKind::Coil => Request::ReadCoils(block.start, block.count),
            RegisterKind::Discrete => Request::ReadDiscreteInputs(block.start, block.count),
        };
        let response = match timeout(deadline, ctx.call(request)).await {
            Err(_) => {
                return Outcome::Failed(Failure::Timeout, format!("no answer within {deadline:?}"))
            }
            Ok(Err(tokio_modbus::Error::Transport(err))) => {
                return Outcome::Failed(self.classify(&err), err.to_string())
            }
            Ok(Err(tokio_modbus::Error::Protocol(err))) => {
                return Outcome::Failed(Failure::Decode, err.to_string())
            }
            Ok(Ok(Err(exception))) => return Outcome::Exception(exception),
            Ok(Ok(Ok(response))) => response,
        };
        check_response(block, response)
    }
}

/// Accepts only the answer that matches the block: same table, enough items.
fn check_response(block: &ReadBlock, response: Response) -> Outcome {
    let count = usize::from(block.count);
    match (block.kind, response) {
        (RegisterKind::Holding, Response::ReadHoldingRegisters(words))
        | (RegisterKind::Input, Response::ReadInputRegisters(words)) => {
            if words.len() == count {
                Outcome::Data(BlockData::Registers(words))
            } else {
                Outcome::Failed(
                    Failure::Decode,
                    format!("asked for {count} registers, got {}", words.len()),
                )
            }
        }
        (RegisterKind::Coil, Response::ReadCoils(mut bits))
        | (RegisterKind::Discrete, Response::ReadDiscreteInputs(mut bits)) => {
            // Bits come padded to whole bytes.
            if bits.len() >= count {
                bits.truncate(count);
                Outcome::Data(BlockData::Bits(bits))
            } else {
                Outcome::Failed(
                    Failure::Decode,
                    format!("asked for {count} bits, got {}", bits.len()),
                )
            }
        }
        (_, other) => Outcome::Failed(
            Failure::Decode,
            format!("answer {other:?} does not match the request"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(kind: RegisterKind, count: u16) -> ReadBlock {
        ReadBlock {
            kind,
            start: 0,
            count,
            points: vec![0],
        }
    }

    #[test]
    fn answers_must_match_the_request() {
        let b = block(RegisterKind::Input, 2);
        assert!(matches!(
            check_response(&b, Response::ReadInputRegisters(vec![1, 2])),
            Outcome::Data(BlockData::Registers(w)) if w == [1, 2]
        ));
        assert!(matches!(
            check_response(&b, Response::ReadInputRegisters(vec![1])),
            Outcome::Failed(Failure::Decode, _)
        ));
        assert!(matches!(
            check_response(&b, Response::ReadHoldingRegisters(vec![1, 2])),
            Outcome::Failed(Failure::Decode, _)
        ));
        let c = block(RegisterKind::Coil, 3);
        assert!(matches!(
            check_response(&c, Response::ReadCoils(vec![true, false, true, false, false, false, false, false])),
            Outcome::Data(BlockData::Bits(b)) if b == [true, false, true]
        ));
        assert!(matches!(
            check_response(&c, Response::ReadCoils(vec![true])),
            Outcome::Failed(Failure::Decode, _)
        ));
    }

    #[test]
    fn serial_timeouts_keep_the_port_tcp_ones_do_not() {
        let tcp = Endpoint::Tcp {
            address: "x:1".into(),
        };
        assert!(tcp.must_reopen_after(Failure::Timeout));
        let rtu = Endpoint::Rtu(RtuConfig {
            path: "/dev/null".into(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            inter_frame_delay_ms: 0,
        });
        assert!(!rtu.must_reopen_after(Failure::Timeout));
        assert!(rtu.must_reopen_after(Failure::Decode));
        assert!(rtu.must_reopen_after(Failure::Io));
    }
}
