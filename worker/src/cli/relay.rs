//! `outbox-worker relay`

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::leader::{LeaderArgs, Role};
use super::{DatabaseArgs, Sidecars, duration};
use outbox_worker::health::Health;
use outbox_worker::ident::{TableName, TopicName};
use outbox_worker::metrics::RelayMetrics;
use outbox_worker::probe::{Figures, Probe, probe_pool};
use outbox_worker::pubsub::{self, Batching, PubSubResource, Publishers};
use outbox_worker::relay;
use outbox_worker::relay::store::OutboxStore;
use outbox_worker::relay::{Relay, RelayConfig, TermEnd};
use outbox_worker::{db, report, shutdown};

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
    #[arg(long, env = "BATCH_SIZE", default_value_t = relay::DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Claimed batches in flight at once.
    #[arg(long, env = "PIPELINE_DEPTH", default_value_t = relay::DEFAULT_PIPELINE_DEPTH as u32, value_parser = clap::value_parser!(u32).range(1..=32))]
    pipeline_depth: u32,
    /// Payload bytes a batch aims to hold (bounds memory).
    #[arg(long, env = "BATCH_BYTES", default_value_t = relay::DEFAULT_BATCH_BYTES)]
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
    /// How often readiness and the lag figures are refreshed (also the
    /// server-side bound of each figure's query).
    #[arg(long, env = "PROBE_INTERVAL", default_value = "5s", value_parser = duration)]
    probe_interval: Duration,
    /// Times a routed topic may refuse a row (PERMISSION_DENIED, NOT_FOUND,
    /// ...) before the row is dead-lettered; the topic is set aside between
    /// attempts, with the retry backoff, while other topics flow.
    #[arg(long, env = "MAX_PUBLISH_ATTEMPTS", default_value_t = relay::DEFAULT_MAX_PUBLISH_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..))]
    max_publish_attempts: u32,
    /// A topic's publisher unused for this long is let go.
    #[arg(long, env = "PUBLISHER_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    publisher_idle_timeout: Duration,
    /// Apply the migrations before relaying.
    #[arg(long, env = "MIGRATE", default_value_t = false)]
    migrate: bool,
    #[command(flatten)]
    election: LeaderArgs,
}

/// Runs the relay until SIGTERM.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
    args.election.check()?;
    let config = RelayConfig {
        topic: args.topic.clone(),
        batch_size: args.batch_size,
        pipeline_depth: args.pipeline_depth as usize,
        batch_bytes: args.batch_bytes,
        poll_interval: args.poll_interval,
        publish_timeout: args.publish_timeout,
        shutdown_timeout: args.shutdown_timeout,
        retry_min: args.retry_min,
        retry_max: args.retry_max,
        max_publish_attempts: args.max_publish_attempts,
    };
    anyhow::ensure!(
        args.liveness_timeout > config.shortest_liveness_timeout(),
        "--liveness-timeout ({:?}) must exceed --publish-timeout ({:?}) + 5s: a batch may wait that long for Pub/Sub",
        args.liveness_timeout,
        args.publish_timeout
    );
    let stop = shutdown::on_signal();
    let options = db::connect_options(&args.database.database_url)?;
    tracing::info!(database = %db::describe(&options), "connecting lazily");
    // A claim of a leader that went silent must not hold its rows forever,
    // and a claim the relay still waits on must not be ended by the server.
    let idle_tx_timeout = config.idle_in_transaction_timeout().as_millis().to_string();
    let pool = db::lazy_pool(
        options.clone().options([(
            "idle_in_transaction_session_timeout",
            idle_tx_timeout.as_str(),
        )]),
        args.pipeline_depth + 3,
    );
    if args.migrate {
        db::migrate(&pool).await.context("applying migrations")?;
    }

    let endpoint = super::pubsub_endpoint();
    let base = pubsub::base_publisher(&endpoint, args.publish_timeout)
        .await
        .context("creating the Pub/Sub publisher")?;
    let resource = match pubsub::topic_admin(&endpoint).await {
        Ok(admin) => Some(Arc::new(PubSubResource::Topic(admin, args.topic.clone()))),
        Err(e) => {
            tracing::warn!(error = %e, "no topic admin client; readiness follows publish results");
            None
        }
    };

    let mut registry = Registry::default();
    outbox_telemetry::SpanMetrics::global().register(&mut registry);
    let metrics = RelayMetrics::register(&mut registry);
    let health = Health::new(args.liveness_timeout);
    let store = OutboxStore::new(args.table.clone())?;
    let (figures, figures_rx) = tokio::sync::watch::channel(Figures::default());
    let sidecars = Sidecars::start(
        args.health_addr,
        &health,
        Arc::new(registry),
        Probe {
            pool: probe_pool(&options, args.probe_interval),
            queries: store.probe_queries(),
            backlog: metrics.backlog.clone(),
            oldest_age: metrics.oldest_pending_age.clone(),
            parked: None,
            figures,
            ready: metrics.ready.clone(),
            resource,
            health: health.clone(),
            interval: args.probe_interval,
        },
    )
    .await?;

    let publishers = Publishers::new(base, Batching::default(), args.publisher_idle_timeout);
    let mut relay = Relay::new(
        config,
        pool.clone(),
        store,
        publishers,
        metrics.clone(),
        health.clone(),
    );
    let election = args
        .election
        .start(
            Role::Relay,
            &options,
            &args.table,
            report::relay_source(metrics.clone(), figures_rx),
        )
        .await?;
    let gauges = (&metrics.is_leader, &metrics.leader_transitions);
    election
        .lead((&health, &stop), gauges, "relaying", async |lost, fence| {
            // A claim that found the lock gone before the elector did asks
            // to wait for the elector to notice.
            relay.run(&stop, lost, fence).await == TermEnd::NotLeader
        })
        .await;
    stop.cancel();
    sidecars.stop().await;
    pool.close().await;
    Ok(())
}
