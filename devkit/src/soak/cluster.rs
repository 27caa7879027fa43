//! The system under test, as a user would run it: PostgreSQL, the Pub/Sub
//! emulator, two relay replicas electing a leader through PostgreSQL (each
//! behind its own links, so that one can be partitioned or slowed down),
//! the inbox worker, four application processors, and audit subscribers on
//! every topic. Faults act on it through the operations here.

use anyhow::Context;
use futures::future::BoxFuture;
use outbox_worker::app::{HandlerError, InboxMessage, InboxProcessor, ProcessorConfig};
use sqlx::{PgConnection, PgPool};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::{Collector, Emulator, Postgres, Proxy, WorkerProcess};

/// The Pub/Sub project of the soak.
pub const PROJECT: &str = "soak";
/// The relay's own topic (short id).
pub const MAIN_TOPIC: &str = "orders";
/// Topics rows are routed to.
pub const ROUTED_TOPICS: [&str; 2] = ["audit-log", "notifications"];
/// A routed topic that does not exist (poison rows go there).
pub const MISSING_TOPIC: &str = "no-such-topic";
/// Streaming pulls of the main topic's audit subscriber.
pub const AUDIT_STREAMS: usize = 2;

/// Relay settings of the soak: the defaults, but faster election and
/// retries, so that a fault's effects fit in a short run.
pub const RELAY_ENV: [(&str, &str); 9] = [
    ("LEADER_ELECTION", "postgres"),
    ("LEASE_DURATION", "6s"),
    ("RENEW_DEADLINE", "4s"),
    ("RETRY_PERIOD", "1s"),
    ("PUBLISH_TIMEOUT", "10s"),
    ("RETRY_MAX", "2s"),
    ("MAX_PUBLISH_ATTEMPTS", "5"),
    ("PROBE_INTERVAL", "1s"),
    ("RUST_LOG", "info"),
];
/// Application processors (each a connection running one batch at a time).
pub const PROCESSORS: usize = 4;
/// Rows in flight per relay at most (batch size 5,000 × pipeline depth 2):
/// the duplicates one fault may cause.
pub const IN_FLIGHT_BOUND: usize = 10_000;

/// Full resource name of a topic of the soak's project.
pub fn topic(id: &str) -> String {
    format!("projects/{PROJECT}/topics/{id}")
}

/// The audit subscription of a topic.
pub fn audit_subscription(topic_id: &str) -> String {
    format!("projects/{PROJECT}/subscriptions/{topic_id}-audit")
}

/// The inbox worker's subscription (on the main topic).
pub fn inbox_subscription() -> String {
    format!("projects/{PROJECT}/subscriptions/{MAIN_TOPIC}-inbox")
}

/// One relay replica: its process and its two links.
pub struct Replica {
    pub name: String,
    pub process: WorkerProcess,
    /// Its link to PostgreSQL (partitions).
    pub db_link: Proxy,
    /// Its link to Pub/Sub (slow links, emulator restarts).
    pub pubsub_link: Proxy,
    /// Processes started for this replica so far.
    pub generation: usize,
}

/// Everything running.
pub struct Cluster {
    pub pg: Postgres,
    pub emulator: Emulator,
    /// The soak's own connections (direct, never faulted but by restarts).
    pub pool: PgPool,
    pub database_url: String,
    pub replicas: Vec<Replica>,
    pub inbox: WorkerProcess,
    /// Audit subscribers, main topic first, then the routed topics.
    pub audits: Vec<(String, Collector)>,
    worker_bin: PathBuf,
    log_dir: PathBuf,
    processors: CancellationToken,
}

impl Cluster {
    /// Starts everything and waits until a relay leads and the inbox is ready.
    pub async fn start(worker_bin: PathBuf, log_dir: PathBuf) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&log_dir)?;
        let (pg, emulator) = tokio::try_join!(Postgres::start(), Emulator::start_for_long_runs())?;
        let database_url = pg.create_database("soak").await?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(40)
            .connect(&database_url)
            .await?;
        outbox_worker::db::migrate(&pool).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(super::load::SCHEMA))
            .execute(&pool)
            .await?;
        create_pubsub(&emulator).await?;
        let mut cluster = Cluster {
            inbox: spawn_inbox(&worker_bin, &log_dir, &database_url, &emulator.host(), 0)?,
            pg,
            pool,
            database_url,
            replicas: Vec::new(),
            audits: Vec::new(),
            worker_bin,
            log_dir,
            processors: CancellationToken::new(),
            emulator,
        };
        for name in ["relay-a", "relay-b"] {
            let db_link = Proxy::start(format!("127.0.0.1:{}", cluster.pg.port())).await?;
            let pubsub_link = Proxy::start(cluster.emulator.host()).await?;
            let process = cluster.spawn_relay(name, &db_link, &pubsub_link, 0)?;
            cluster.replicas.push(Replica {
                name: name.to_owned(),
                process,
                db_link,
                pubsub_link,
                generation: 0,
            });
        }
        let endpoint = cluster.emulator.endpoint();
        for (i, id) in std::iter::once(MAIN_TOPIC).chain(ROUTED_TOPICS).enumerate() {
            let streams = if i == 0 { AUDIT_STREAMS } else { 1 };
            let collector =
                Collector::without_data(endpoint.clone(), audit_subscription(id), streams);
            cluster.audits.push((id.to_owned(), collector));
        }
        cluster.start_processors(PROCESSORS);
        crate::wait_for("a relay to lead", Duration::from_secs(60), || async {
            cluster.leader().await
        })
        .await?;
        cluster.inbox.wait_ready(Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    fn spawn_relay(
        &self,
        name: &str,
        db_link: &Proxy,
        pubsub_link: &Proxy,
        generation: usize,
    ) -> anyhow::Result<WorkerProcess> {
        let port = crate::free_port()?;
        let url = self
            .database_url
            .replace(&format!("127.0.0.1:{}", self.pg.port()), &db_link.addr());
        let mut env = vec![
            ("DATABASE_URL", url),
            ("PUBSUB_TOPIC", topic(MAIN_TOPIC)),
            ("PUBSUB_EMULATOR_HOST", pubsub_link.addr()),
            ("POD_NAME", name.to_owned()),
        ];
        env.extend(RELAY_ENV.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let log = self.log_dir.join(format!("{name}.{generation}.log"));
        WorkerProcess::spawn(&self.worker_bin, &["relay"], &env, port, log)
    }

    /// Starts a new process for a replica whose process was stopped.
    pub fn respawn(&mut self, index: usize) -> anyhow::Result<()> {
        let generation = self.replicas[index].generation + 1;
        let replica = &self.replicas[index];
        let process = self.spawn_relay(
            &replica.name,
            &replica.db_link,
            &replica.pubsub_link,
            generation,
        )?;
        let replica = &mut self.replicas[index];
        replica.process = process;
        replica.generation = generation;
        Ok(())
    }

    /// The replica that leads now, by its own account.
    pub async fn leader(&self) -> Option<usize> {
        for (i, replica) in self.replicas.iter().enumerate() {
            if replica.process.metric("outbox_is_leader").await == Some(1.0) {
                return Some(i);
            }
        }
        None
    }

    /// Creates the topics and subscriptions again (after an emulator restart).
    pub async fn recreate_pubsub(&self) -> anyhow::Result<()> {
        create_pubsub(&self.emulator).await
    }

    /// Runs `n` application processors: each message inserts its key and
    /// sequence number into `soak_processed`, in the message's transaction.
    fn start_processors(&self, n: usize) {
        let mut config = ProcessorConfig::new("inbox".parse().expect("a valid table name"));
        config.batch_size = 500;
        config.poll_interval = Duration::from_millis(50);
        config.retry_min = Duration::from_millis(100);
        config.retry_max = Duration::from_secs(2);
        for _ in 0..n {
            let processor = InboxProcessor::new(self.pool.clone(), config.clone());
            let stop = self.processors.clone();
            tokio::spawn(async move {
                let handler = record_processed as HandlerFn;
                processor.run(&handler, stop).await;
            });
        }
    }

    /// Stops the processors.
    pub fn stop_processors(&self) {
        self.processors.cancel();
    }
}

type HandlerFn =
    for<'a> fn(&'a mut PgConnection, &'a InboxMessage) -> BoxFuture<'a, Result<(), HandlerError>>;

fn record_processed<'a>(
    tx: &'a mut PgConnection,
    message: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let seq: i64 = message
            .attributes
            .get("seq")
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        sqlx::query(
            "INSERT INTO soak_processed (message_id, ordering_key, seq) VALUES ($1, $2, $3)",
        )
        .bind(&message.message_id)
        .bind(message.ordering_key.as_deref())
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        Ok(())
    })
}

fn spawn_inbox(
    worker_bin: &std::path::Path,
    log_dir: &std::path::Path,
    database_url: &str,
    emulator_host: &str,
    generation: usize,
) -> anyhow::Result<WorkerProcess> {
    let port = crate::free_port()?;
    let env = [
        // One inbox worker, so no election: with one, a PostgreSQL restart
        // ends its lock session and so its term, which closes its streaming
        // pulls; the emulator then stops delivering an ordered subscription
        // to the new streams (docs/inbox.md, emulator limitation), which
        // real Pub/Sub does not. Inbox failover is tested in
        // worker/tests/integration/inbox_failover.rs.
        ("LEADER_ELECTION", "none".to_owned()),
        ("DATABASE_URL", database_url.to_owned()),
        ("PUBSUB_SUBSCRIPTION", inbox_subscription()),
        ("PUBSUB_EMULATOR_HOST", emulator_host.to_owned()),
        ("INBOX_STREAMS", "2".to_owned()),
        ("RETRY_MAX", "2s".to_owned()),
        ("PROBE_INTERVAL", "1s".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    let log = log_dir.join(format!("inbox.{generation}.log"));
    WorkerProcess::spawn(worker_bin, &["inbox"], &env, port, log)
}

/// Topics (main and routed) with an ordered audit subscription each, and the
/// inbox subscription on the main topic.
async fn create_pubsub(emulator: &Emulator) -> anyhow::Result<()> {
    let main = topic(MAIN_TOPIC);
    for id in std::iter::once(MAIN_TOPIC).chain(ROUTED_TOPICS) {
        emulator.create_topic(&topic(id)).await?;
        emulator
            .create_subscription(&audit_subscription(id), &topic(id), true)
            .await?;
    }
    emulator
        .create_subscription(&inbox_subscription(), &main, true)
        .await
        .context("inbox subscription")?;
    Ok(())
}
