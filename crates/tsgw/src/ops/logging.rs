//! Logs go to stderr, where journald picks them up.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `RUST_LOG` wins over the configured level, so one run can be debugged
/// without editing the config.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(with_quiet_broker(level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: journald would store the escape codes verbatim.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // try_init: a second call (tests, `demo` starting a gateway) keeps the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// rumqttd logs every routine device disconnect at ERROR level. The gateway
/// logs device connections itself (and the embedded broker's real failures),
/// so rumqttd's own output is off unless the filter asks for it by name.
fn with_quiet_broker(level: &str) -> String {
    if level.contains("rumqttd") {
        level.to_owned()
    } else {
        format!("{level},rumqttd=off")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_broker_is_quiet_unless_asked_for() {
        assert_eq!(with_quiet_broker("info"), "info,rumqttd=off");
        assert_eq!(
            with_quiet_broker("info,rumqttd=debug"),
            "info,rumqttd=debug"
        );
    }
}
