//! `tsgw`: the ThingSpeak edge gateway.

mod config;
mod demo;
mod gateway;
mod ops;
mod pipeline;
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
            default_value = "/etc/tsgw/gateway.toml"
        )]
        config: PathBuf,
    },
    /// Validate a config and print it with secrets masked; exits non-zero on errors.
    CheckConfig {
        #[arg(
            long,
            short,
            env = "TSGW_CONFIG",
            default_value = "/etc/tsgw/gateway.toml"
        )]
        config: PathBuf,
    },
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
            default_value = "/etc/tsgw/gateway.toml"
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
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(config),
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

fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let config = GatewayConfig::load(&path)?;
    println!(
        "# {} is valid. Effective config (secrets masked):",
        path.display()
    );
    print!("{}", config.to_masked_toml()?);
    Ok(())
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
