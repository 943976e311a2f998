//! Logging: JSON lines by default (for log shippers), or human-readable with `TXPIPE_LOG_FORMAT=pretty`.

use crate::config::LogFormat;
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. `RUST_LOG` filters (default `info`). Safe to call twice.
pub fn init(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let result = match format {
        LogFormat::Json => {
            fmt().json().with_current_span(false).with_env_filter(filter).with_writer(std::io::stderr).try_init()
        }
        LogFormat::Pretty => fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init(),
    };
    if result.is_ok() {
        tracing::info!(service, version = env!("CARGO_PKG_VERSION"), "starting");
    }
}
