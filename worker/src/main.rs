//! `outbox-worker`: the binary users deploy.
//!
//! - `outbox-worker migrate` applies the embedded migrations.
//! - `outbox-worker relay` relays the outbox table to Pub/Sub.
//!
//! Every flag has an environment fallback, so the same image is configured by
//! flags on a laptop and by environment variables in a Deployment.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outbox_worker::health::{Component, Health};
use outbox_worker::ident::{TableName, TopicName};
use outbox_worker::metrics::RelayMetrics;
use outbox_worker::pubsub::{self, Batching, Endpoint, Publishers};
use outbox_worker::relay::store::OutboxStore;
use outbox_worker::relay::{Relay, RelayConfig};
use outbox_worker::telemetry::{self, LogFormat};
use outbox_worker::{db, relay, shutdown};

#[derive(Parser)]
#[command(name = "outbox-worker", version, about = "Transactional outbox relay: PostgreSQL -> Google Cloud Pub/Sub")]
struct Cli {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded database migrations (idempotent).
    Migrate(MigrateArgs),
    /// Relay committed outbox rows to Pub/Sub.
    Relay(Box<RelayArgs>),
}

#[derive(Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL (never logged).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 5s, 1m)"))
}

#[derive(Args)]
struct RelayArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Outbox table, optionally schema-qualified (`schema.table`).
    #[arg(long, env = "OUTBOX_TABLE", default_value = "outbox")]
    table: TableName,
    /// Default topic, `projects/PROJECT/topics/TOPIC`.
    #[arg(long, env = "PUBSUB_TOPIC")]
    topic: TopicName,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    health_addr: SocketAddr,
    /// Rows claimed per transaction.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Claimed batches in flight at once.
    #[arg(long, env = "PIPELINE_DEPTH", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=32))]
    pipeline_depth: u32,
    /// Payload bytes a batch aims to hold (bounds memory).
    #[arg(long, env = "BATCH_BYTES", default_value_t = 16 * 1024 * 1024)]
    batch_bytes: usize,
    /// Fallback poll interval when no notification arrives.
    #[arg(long, env = "POLL_INTERVAL", default_value = "5s", value_parser = duration)]
    poll_interval: Duration,
    /// How long Pub/Sub may take to acknowledge a batch before it is retried.
    #[arg(long, env = "PUBLISH_TIMEOUT", default_value = "30s", value_parser = duration)]
    publish_timeout: Duration,
    /// How long to finish in-flight batches after SIGTERM.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = duration)]
    shutdown_timeout: Duration,
    /// First delay after a failure.
    #[arg(long, env = "RETRY_MIN", default_value = "100ms", value_parser = duration)]
    retry_min: Duration,
    /// Longest delay between retries.
    #[arg(long, env = "RETRY_MAX", default_value = "10s", value_parser = duration)]
    retry_max: Duration,
    /// /healthz fails when the loop made no progress for this long.
    #[arg(long, env = "LIVENESS_TIMEOUT", default_value = "60s", value_parser = duration)]
    liveness_timeout: Duration,
    /// How often readiness and the backlog gauge are refreshed.
    #[arg(long, env = "PROBE_INTERVAL", default_value = "5s", value_parser = duration)]
    probe_interval: Duration,
    /// Apply the migrations before relaying.
    #[arg(long, env = "MIGRATE", default_value_t = false)]
    migrate: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Migrate(args) => migrate(args).await,
        Command::Relay(args) => run_relay(*args).await,
    }
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let options = db::connect_options(&args.database.database_url)?;
    let target = db::describe(&options);
    let pool = db::lazy_pool(options, 1);
    db::migrate(&pool)
        .await
        .with_context(|| format!("migrating {target}"))?;
    tracing::info!(database = %target, "migrations applied");
    Ok(())
}

async fn run_relay(args: RelayArgs) -> anyhow::Result<()> {
    let stop = shutdown::on_signal();
    let options = db::connect_options(&args.database.database_url)?;
    tracing::info!(database = %db::describe(&options), "connecting lazily");
    let pool = db::lazy_pool(options, args.pipeline_depth + 3);
    if args.migrate {
        db::migrate(&pool).await.context("applying migrations")?;
    }

    let endpoint = Endpoint::from_env();
    if let Some(host) = &endpoint.emulator_host {
        tracing::info!(%host, "using the Pub/Sub emulator without credentials");
    }
    let base = pubsub::base_publisher(&endpoint, args.publish_timeout)
        .await
        .context("creating the Pub/Sub publisher")?;
    let admin = match pubsub::topic_admin(&endpoint).await {
        Ok(admin) => Some(Arc::new(admin)),
        Err(e) => {
            tracing::warn!(error = %e, "no topic admin client; readiness follows publish results");
            None
        }
    };

    let mut registry = Registry::default();
    let metrics = RelayMetrics::register(&mut registry);
    metrics.is_leader.set(1);
    let registry = Arc::new(registry);
    let health = Health::new(args.liveness_timeout);
    let store = OutboxStore::new(args.table.clone())?;

    let listener = outbox_worker::health::bind(args.health_addr).await?;
    let server = tokio::spawn(outbox_worker::health::serve(
        listener,
        health.clone(),
        vec![Component::Database, Component::PubSub],
        registry.clone(),
        stop.child_token(),
    ));
    let watcher_stop = stop.child_token();
    let watcher = tokio::spawn(relay::watch(
        pool.clone(),
        store.clone(),
        args.topic.clone(),
        admin,
        metrics.clone(),
        health.clone(),
        args.probe_interval,
        watcher_stop.clone(),
    ));

    let config = RelayConfig {
        topic: args.topic,
        batch_size: args.batch_size,
        pipeline_depth: args.pipeline_depth as usize,
        batch_bytes: args.batch_bytes,
        poll_interval: args.poll_interval,
        publish_timeout: args.publish_timeout,
        shutdown_timeout: args.shutdown_timeout,
        retry_min: args.retry_min,
        retry_max: args.retry_max,
    };
    let relay = Relay::new(
        config,
        pool.clone(),
        store,
        Publishers::new(base, Batching::default()),
        metrics,
        health,
    );
    let result = relay.run(stop.clone()).await;
    stop.cancel();
    watcher_stop.cancel();
    let _ = watcher.await;
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "health server failed"),
        Err(e) => tracing::error!(error = %e, "health server panicked"),
    }
    pool.close().await;
    result.context("relay failed")
}
