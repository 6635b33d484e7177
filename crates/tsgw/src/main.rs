//! `tsgw`: the ThingSpeak edge gateway.

mod config;
#[cfg(feature = "demo")]
mod demo;
mod downlink;
mod gateway;
mod ops;
mod pipeline;
mod probe;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::GatewayConfig;

#[derive(Parser)]
#[command(
    name = "tsgw",
    version,
    about = "The ThingSpeak edge gateway: local MQTT, serial and Modbus devices → durable queue → ThingSpeak"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (SIGTERM/SIGINT stop it cleanly, SIGHUP reloads the config).
    Run {
        /// The TOML config file. `TSGW_SECTION__KEY` variables override its keys.
        #[arg(
            long,
            short,
            env = "TSGW_CONFIG",
            default_value = config::DEFAULT_CONFIG
        )]
        config: PathBuf,
    },
    /// Validate a config and print it with secrets masked; exits non-zero on errors.
    CheckConfig {
        #[arg(
            long,
            short,
            env = "TSGW_CONFIG",
            default_value = config::DEFAULT_CONFIG
        )]
        config: PathBuf,
        /// Also poll every [[serial]] and [[modbus]] device once and print the
        /// readings it would queue; exits non-zero naming any device that did
        /// not answer. Stop a running gateway first: it holds the serial ports.
        #[arg(long)]
        test: bool,
        /// With --test: how long a serial device that talks by itself gets to
        /// print a line, seconds.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Read a device once to learn how to configure it.
    #[command(subcommand)]
    Probe(ProbeCommand),
    /// Hash a password for `[mqtt.users]` (or `[http.users]`): reads it from
    /// standard input and prints the line to paste into the config.
    Passwd {
        /// The account name the printed line starts with.
        user: String,
    },
    /// Follow readings as they enter the queue of a running gateway (through
    /// its HTTP listener): device, channel, target, value, measured time.
    Tail {
        /// The gateway's config, to find `http.listen`.
        #[arg(
            long,
            short,
            env = "TSGW_CONFIG",
            default_value = config::DEFAULT_CONFIG
        )]
        config: PathBuf,
        /// The gateway's HTTP address instead (`HOST:PORT`).
        #[arg(long)]
        addr: Option<String>,
        /// A user from `http.users`; the password comes from TSGW_HTTP_PASSWORD or standard input.
        #[arg(long)]
        user: Option<String>,
        /// Only this channel.
        #[arg(long)]
        channel: Option<u64>,
        /// Only this device (a serial port, Modbus unit, MQTT user or rule).
        #[arg(long)]
        device: Option<String>,
        /// Print the feed's JSON lines as they come.
        #[arg(long)]
        json: bool,
    },
    /// Run a self-contained demo: a local ThingSpeak emulator, a gateway and simulated devices.
    #[cfg(feature = "demo")]
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(Subcommand)]
enum ProbeCommand {
    /// Read a block of registers or coils once and show every decoding
    /// (u16/i16, u32/i32/f32 in each word order, f64), then the [[modbus]] lines to paste.
    Modbus(probe::modbus::ModbusProbe),
    /// Print the lines a serial device sends, with what the parser makes of each.
    Serial(probe::serial::SerialProbe),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config, test, wait } => check_config(config, test, wait),
        Command::Probe(ProbeCommand::Modbus(p)) => {
            runtime().and_then(|rt| rt.block_on(probe::modbus::run(p)))
        }
        Command::Probe(ProbeCommand::Serial(p)) => {
            runtime().and_then(|rt| rt.block_on(probe::serial::run(p)))
        }
        Command::Run { config } => run(config),
        Command::Passwd { user } => passwd(&user),
        Command::Tail {
            config,
            addr,
            user,
            channel,
            device,
            json,
        } => runtime().and_then(|rt| {
            rt.block_on(tail::run(tail::TailArgs {
                config,
                addr,
                user,
                channel,
                device,
                json,
            }))
        }),
        #[cfg(feature = "demo")]
        Command::Demo { seconds } => runtime().and_then(|rt| rt.block_on(demo::run(seconds))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tsgw: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tsgw")
        .build()?)
}

fn check_config(path: PathBuf, test: bool, wait: u64) -> anyhow::Result<()> {
    let config = GatewayConfig::load(&path)?;
    if !test {
        println!(
            "# {} is valid. Effective config (secrets masked):",
            path.display()
        );
        print!("{}", config.to_masked_toml()?);
        return Ok(());
    }
    println!("# {} is valid. Polling each device once:", path.display());
    let results = runtime()?.block_on(probe::devices::test_devices(
        &config,
        std::time::Duration::from_secs(wait),
    ));
    print!("{}", probe::devices::render(&results));
    probe::devices::verdict(&results)
}

fn passwd(user: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprintln!("Password for {user} (input is shown; pipe it in to keep it off the screen):");
    }
    let mut password = String::new();
    std::io::stdin().read_line(&mut password)?;
    let password = password.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "the password is empty");
    let hash = tsgw_mqtt::auth::hash_password(password)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("{} = \"{hash}\"", toml_key(user));
    Ok(())
}

/// A TOML key for `name`: bare if it can be, quoted otherwise.
fn toml_key(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    ops::memory::limit_malloc_arenas();
    let config = GatewayConfig::load(&path)?;
    ops::logging::init(&config.log.level, config.log.format);
    install_crypto_provider();
    runtime()?.block_on(gateway::run_until_stopped(path, config))
}

/// rustls needs one process-wide crypto provider; tsgw uses ring everywhere.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
