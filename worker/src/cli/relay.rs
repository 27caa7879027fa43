//! `outbox-worker relay`

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{DatabaseArgs, Sidecars, duration};
use outbox_worker::health::Health;
use outbox_worker::ident::{TableName, TopicName};
use outbox_worker::leader::{
    self, Backend, Leadership, Timings, kubernetes::LeaseElector, postgres::PgElector,
};
use outbox_worker::metrics::RelayMetrics;
use outbox_worker::probe::{Probe, probe_pool};
use outbox_worker::pubsub::{self, Batching, PubSubResource, Publishers};
use outbox_worker::relay;
use outbox_worker::relay::store::OutboxStore;
use outbox_worker::relay::{Relay, RelayConfig, TermEnd};
use outbox_worker::{db, shutdown};
use tokio_util::sync::CancellationToken;

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
    election: ElectionArgs,
}

/// Leader election flags (see `outbox_worker::leader`).
#[derive(Args)]
pub struct ElectionArgs {
    /// Which lock decides the leader: kubernetes (a Lease), postgres (an
    /// advisory lock) or none. Default: kubernetes inside a pod, else postgres.
    #[arg(long, env = "LEADER_ELECTION", value_enum)]
    leader_election: Option<Backend>,
    /// Name of the Lease (kubernetes backend). Default: outbox-relay-<table>.
    #[arg(long, env = "LEASE_NAME")]
    lease_name: Option<String>,
    /// Namespace of the Lease. Default: the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity. Default: the host (pod) name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's lock stays valid without renewal.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How long a leader keeps leading without a confirmed renewal.
    #[arg(long, env = "RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    renew_deadline: Duration,
    /// Time between renewals and between acquisition attempts.
    #[arg(long, env = "RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    retry_period: Duration,
}

impl ElectionArgs {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("outbox-worker-{}", std::process::id()))
        })
    }

    /// Starts the elector; the sender keeps a `none` election alive.
    async fn start(
        &self,
        options: &sqlx::postgres::PgConnectOptions,
        table: &TableName,
        release: CancellationToken,
    ) -> anyhow::Result<(
        Leadership,
        Option<tokio::task::JoinHandle<()>>,
        Option<tokio::sync::watch::Sender<Option<leader::Fence>>>,
    )> {
        let timings = Timings {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        };
        timings.validate()?;
        let identity = self.identity();
        let backend = self.leader_election.unwrap_or_else(Backend::detect);
        tracing::info!(?backend, %identity, "leader election");
        Ok(match backend {
            Backend::None => {
                let (tx, rx) = leader::always_leader();
                (rx, None, Some(tx))
            }
            Backend::Postgres => {
                let (rx, task) = PgElector::new(options.clone(), table.clone(), timings, identity)
                    .spawn(release);
                (rx, Some(task), None)
            }
            Backend::Kubernetes => {
                let client = kube::Client::try_default().await.context(
                    "--leader-election kubernetes needs in-cluster credentials or a kubeconfig",
                )?;
                let namespace = self
                    .lease_namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_owned());
                let name = self.lease_name.clone().unwrap_or_else(|| {
                    format!(
                        "outbox-relay-{}",
                        table.name().replace('_', "-").to_lowercase()
                    )
                });
                tracing::info!(lease = %name, %namespace, "using a Kubernetes Lease");
                let api = kube::Api::namespaced(client, &namespace);
                let (rx, task) = LeaseElector::new(api, name, identity, timings).spawn(release);
                (rx, Some(task), None)
            }
        })
    }
}

/// Runs the relay until SIGTERM.
pub async fn run(args: RelayArgs) -> anyhow::Result<()> {
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
    let release = CancellationToken::new();
    let (mut leadership, elector, _keep) = args
        .election
        .start(&options, &args.table, release.clone())
        .await?;
    lead_while_elected(&mut relay, &mut leadership, &metrics, &health, &stop).await;
    // Release only after the in-flight batches were finished, so the next
    // leader starts after our last commit.
    release.cancel();
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    stop.cancel();
    sidecars.stop().await;
    pool.close().await;
    Ok(())
}

/// Relays during each term of leadership, stands by in between.
async fn lead_while_elected(
    relay: &mut Relay,
    leadership: &mut Leadership,
    metrics: &RelayMetrics,
    health: &Health,
    stop: &CancellationToken,
) {
    loop {
        tracing::info!("standing by until elected");
        // A standby is alive too: keep /healthz green while waiting.
        let fence = loop {
            health.heartbeat();
            let wait = leader::wait_until_leading(leadership, stop);
            match tokio::time::timeout(Duration::from_secs(1), wait).await {
                Ok(Some(fence)) => break fence,
                Ok(None) => return,
                Err(_) => continue,
            }
        };
        metrics.is_leader.set(1);
        metrics.leader_transitions.inc();
        tracing::info!("leading: relaying");
        let lost = leader::lost_token(leadership.clone());
        let end = relay.run(stop, &lost, &fence).await;
        metrics.is_leader.set(0);
        metrics.leader_transitions.inc();
        if end == TermEnd::NotLeader {
            // A claim found the lock gone before the elector did: wait for
            // the elector to notice, so this term is not started again.
            let noticed = leadership.wait_for(Option::is_none);
            tokio::select! {
                _ = noticed => {},
                _ = stop.cancelled() => {},
            }
        }
        lost.cancel();
        if stop.is_cancelled() {
            return;
        }
        tracing::warn!("no longer leading: standing by");
    }
}
