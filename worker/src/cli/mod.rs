//! Command-line interface: one module per subcommand.

mod inbox;
mod leader;
mod migrate;
mod relay;

use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use outbox_telemetry::LogFormat;
use outbox_worker::health::{self, Health};
use outbox_worker::probe::Probe;
use outbox_worker::pubsub::Endpoint;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

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

/// The Pub/Sub endpoint from the environment, said once in the log.
pub fn pubsub_endpoint() -> Endpoint {
    let endpoint = Endpoint::from_env();
    if let Some(host) = &endpoint.emulator_host {
        tracing::info!(%host, "using the Pub/Sub emulator without credentials");
    }
    endpoint
}

/// What runs beside every worker: the HTTP server of the probes and metrics,
/// and the background readiness probe. They keep answering until the worker
/// has finished, so a draining worker is still observable.
pub struct Sidecars {
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    probe: tokio::task::JoinHandle<()>,
}

impl Sidecars {
    /// Binds `addr` first, so a taken port fails start-up.
    pub async fn start(
        addr: SocketAddr,
        health: &Health,
        registry: Arc<Registry>,
        probe: Probe,
    ) -> anyhow::Result<Sidecars> {
        let stop = CancellationToken::new();
        let listener = health::bind(addr).await?;
        let server = tokio::spawn(health::serve(
            listener,
            health.clone(),
            health::READINESS.to_vec(),
            registry,
            stop.clone(),
        ));
        let probe = tokio::spawn(probe.run(stop.clone()));
        Ok(Sidecars {
            stop,
            server,
            probe,
        })
    }

    /// Stops both and reports a failed server.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.probe.await;
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "health server failed"),
            Err(e) => tracing::error!(error = %e, "health server panicked"),
        }
    }
}
