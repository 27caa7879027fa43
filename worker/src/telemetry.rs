//! Logging setup: human-readable by default, JSON when `LOG_FORMAT=json`.

use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines for terminals.
    Text,
    /// One JSON object per line for log collectors.
    Json,
}

/// Installs the global subscriber. The level comes from `RUST_LOG`
/// (default `info`); dependencies are kept at `warn` unless asked for.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,google_cloud_pubsub=warn,h2=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
