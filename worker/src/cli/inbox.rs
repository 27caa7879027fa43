//! `outbox-worker inbox`

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::leader::{LeaderArgs, Role};
use super::{DatabaseArgs, Sidecars, duration};
use outbox_worker::health::Health;
use outbox_worker::ident::{SubscriptionName, TableName};
use outbox_worker::inbox::store::InboxStore;
use outbox_worker::inbox::{FlowControl, Inbox, InboxConfig, source};
use outbox_worker::metrics::InboxMetrics;
use outbox_worker::probe::{Figures, Probe, probe_pool};
use outbox_worker::pubsub::{self, PubSubResource};
use outbox_worker::{db, report, shutdown};

#[derive(Args)]
pub struct InboxArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Subscription to pull, `projects/PROJECT/subscriptions/SUBSCRIPTION`.
    #[arg(long, env = "PUBSUB_SUBSCRIPTION")]
    subscription: SubscriptionName,
    /// Inbox table, optionally schema-qualified (`schema.table`).
    #[arg(long, env = "INBOX_TABLE", default_value = "inbox")]
    table: TableName,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    health_addr: SocketAddr,
    /// Messages stored per transaction, at most.
    #[arg(long, env = "INBOX_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// How long a batch waits for more messages once it has one.
    #[arg(long, env = "INBOX_LINGER", default_value = "5ms", value_parser = duration)]
    linger: Duration,
    /// Parallel streaming pulls. The emulator paces each stream at about
    /// 2,000 messages/s (100 every 50 ms), so throughput scales with streams.
    /// Pub/Sub keeps an ordering key on one stream at a time, so ordered
    /// subscriptions keep their per-key order with several streams.
    #[arg(long, env = "INBOX_STREAMS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=16))]
    streams: u32,
    /// Unacknowledged messages Pub/Sub may hand to each stream.
    #[arg(long, env = "INBOX_MAX_OUTSTANDING_MESSAGES", default_value_t = 1_250)]
    max_outstanding_messages: i64,
    /// Unacknowledged bytes Pub/Sub may hand to each stream.
    #[arg(long, env = "INBOX_MAX_OUTSTANDING_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_outstanding_bytes: i64,
    /// Lease the client keeps extending while a message is being stored;
    /// after a crash, unacknowledged messages are redelivered this much later.
    #[arg(long, env = "INBOX_ACK_DEADLINE", default_value = "10s", value_parser = duration)]
    ack_deadline: Duration,
    /// How long to store what was received after SIGTERM.
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
    /// Apply the migrations before starting.
    #[arg(long, env = "MIGRATE", default_value_t = false)]
    migrate: bool,
    /// Only the leader pulls; standbys take over when it stops or fails.
    #[command(flatten)]
    election: LeaderArgs,
}

/// Runs the inbox worker until SIGTERM.
pub async fn run(args: InboxArgs) -> anyhow::Result<()> {
    args.election.check()?;
    let stop = shutdown::on_signal();
    let options = db::connect_options(&args.database.database_url)?;
    tracing::info!(database = %db::describe(&options), "connecting lazily");
    let pool = db::lazy_pool(options.clone(), 4);
    if args.migrate {
        db::migrate(&pool).await.context("applying migrations")?;
    }

    let endpoint = super::pubsub_endpoint();
    let client = source::subscriber(&endpoint, args.streams as usize)
        .await
        .context("creating the Pub/Sub subscriber")?;
    let resource = match pubsub::subscription_admin(&endpoint).await {
        Ok(admin) => Some(Arc::new(PubSubResource::Subscription(
            admin,
            args.subscription.clone(),
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "no subscription admin client; readiness follows the pull");
            None
        }
    };

    let mut registry = Registry::default();
    outbox_telemetry::SpanMetrics::global().register(&mut registry);
    let metrics = InboxMetrics::register(&mut registry);
    let health = Health::new(args.liveness_timeout);
    let store = InboxStore::new(args.table.clone())?;
    let (figures, figures_rx) = tokio::sync::watch::channel(Figures::default());
    let sidecars = Sidecars::start(
        args.health_addr,
        &health,
        Arc::new(registry),
        Probe {
            pool: probe_pool(&options, args.probe_interval),
            queries: store.probe_queries(),
            backlog: metrics.backlog.clone(),
            oldest_age: metrics.oldest_unprocessed_age.clone(),
            parked: Some(metrics.parked.clone()),
            figures,
            ready: metrics.ready.clone(),
            resource,
            health: health.clone(),
            interval: args.probe_interval,
        },
    )
    .await?;

    let config = InboxConfig {
        subscription: args.subscription,
        batch_size: args.batch_size as usize,
        linger: args.linger,
        flow: FlowControl {
            streams: args.streams as usize,
            max_outstanding_messages: args.max_outstanding_messages.max(1),
            max_outstanding_bytes: args.max_outstanding_bytes.max(1024),
            ack_deadline: args.ack_deadline,
        },
        shutdown_timeout: args.shutdown_timeout,
        retry_min: args.retry_min,
        retry_max: args.retry_max,
    };
    let election = args
        .election
        .start(
            Role::Inbox,
            &options,
            &args.table,
            report::inbox_source(metrics.clone(), figures_rx),
        )
        .await?;
    let gauges = (&metrics.is_leader, &metrics.leader_transitions);
    let worker = Inbox::new(
        config,
        pool.clone(),
        store,
        client,
        metrics.clone(),
        health.clone(),
    );
    election
        .lead((&health, &stop), gauges, "pulling", async |lost, _fence| {
            // No fence to check: a message stored by two replicas is
            // absorbed by the unique key. The term ends after the last
            // acknowledgements were sent, so the next leader is not
            // handed what this one stored.
            worker.run_term(&stop, lost).await;
            false
        })
        .await;
    stop.cancel();
    sidecars.stop().await;
    pool.close().await;
    Ok(())
}
