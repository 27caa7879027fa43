//! `outbox-worker relay`

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{DatabaseArgs, duration};
use outbox_worker::health::{Component, Health};
use outbox_worker::ident::{TableName, TopicName};
use outbox_worker::metrics::RelayMetrics;
use outbox_worker::pubsub::{self, Batching, Endpoint, Publishers};
use outbox_worker::relay::store::OutboxStore;
use outbox_worker::relay::{Relay, RelayConfig};
use outbox_worker::{db, relay, shutdown};

#[derive(Args)]
pub struct RelayArgs {
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

/// Runs the relay until SIGTERM.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
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
    let watcher = tokio::spawn(
        relay::Probe {
            pool: pool.clone(),
            store: store.clone(),
            topic: args.topic.clone(),
            admin,
            metrics: metrics.clone(),
            health: health.clone(),
            interval: args.probe_interval,
        }
        .run(watcher_stop.clone()),
    );

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
