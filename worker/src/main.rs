//! `outbox-worker`: the binary users deploy.
//!
//! - `outbox-worker migrate` applies the embedded migrations.
//! - `outbox-worker relay` relays the outbox table to Pub/Sub.
//!
//! Every flag has an environment fallback, so the same image is configured by
//! flags on a laptop and by environment variables in a Deployment. Each
//! subcommand lives in its own module under `cli/`.

mod cli;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    // Logs, and traces when OTEL_EXPORTER_OTLP_ENDPOINT is set; the guard
    // flushes queued spans at exit.
    let _telemetry = outbox_telemetry::init(
        cli.log_format,
        "info,sqlx=warn,google_cloud_pubsub=warn,h2=warn",
        outbox_worker::trace::TARGET,
        "outbox-worker",
    )?;
    cli.command.run().await
}
