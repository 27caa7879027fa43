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
    outbox_worker::telemetry::init(cli.log_format);
    cli.command.run().await
}
