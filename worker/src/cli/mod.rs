//! Command-line interface: one module per subcommand.

mod inbox;
mod migrate;
mod relay;

use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use outbox_worker::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "outbox-worker",
    version,
    about = "Transactional outbox relay: PostgreSQL -> Google Cloud Pub/Sub"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply the embedded database migrations (idempotent).
    Migrate(migrate::MigrateArgs),
    /// Relay committed outbox rows to Pub/Sub.
    Relay(Box<relay::RelayArgs>),
    /// Store messages of a Pub/Sub subscription in the inbox table, each once.
    Inbox(Box<inbox::InboxArgs>),
}

#[derive(Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL (never logged).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Parses `500ms`, `5s`, `1m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 5s, 1m)"))
}

impl Command {
    /// Runs the chosen subcommand to completion.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Migrate(args) => migrate::run(args).await,
            Command::Relay(args) => relay::run(*args).await,
            Command::Inbox(args) => inbox::run(*args).await,
        }
    }
}
