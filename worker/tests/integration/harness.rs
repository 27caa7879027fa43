//! Shared test infrastructure: one PostgreSQL and one emulator for the whole
//! binary (tests that break them start their own), a fresh database, topic and
//! ordered subscription per test, and the real `outbox-worker` binary.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use devkit::{Collector, Emulator, Postgres, WorkerProcess};
use sqlx::PgPool;
use uuid::Uuid;

pub const PROJECT: &str = "outbox-test";
pub const WAIT: Duration = Duration::from_secs(120);

struct Shared {
    pg_port: u16,
    emulator_host: String,
}

/// Started once, from a thread that lives as long as the test binary (the
/// children's parent-death signal is tied to the spawning thread).
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let started = runtime.block_on(async {
                let (pg, emulator) = tokio::try_join!(Postgres::start(), Emulator::start())?;
                anyhow::Ok((pg, emulator))
            });
            match started {
                Ok((pg, emulator)) => {
                    let _ = tx.send(Ok(Shared {
                        pg_port: pg.port(),
                        emulator_host: emulator.host(),
                    }));
                    // Keep them (and this thread) alive until the process exits.
                    let _keep = (pg, emulator);
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
            }
        });
        match rx.recv() {
            Ok(Ok(shared)) => shared,
            Ok(Err(e)) => panic!("test infrastructure failed to start: {e}"),
            Err(_) => panic!("test infrastructure thread died"),
        }
    })
}

/// Where the database and the emulator of one test are.
pub struct Infra {
    pub database_url: String,
    pub emulator_host: String,
}

/// Everything one test needs: its own database (migrated), topic, ordered
/// subscription and a collector pulling it.
pub struct TestEnv {
    pub name: String,
    pub database_url: String,
    pub emulator_host: String,
    pub topic: String,
    pub subscription: String,
    pub pool: PgPool,
    pub collector: Collector,
}

fn unique(name: &str) -> String {
    format!("{name}_{}", &Uuid::new_v4().simple().to_string()[..8])
}

impl TestEnv {
    /// A test environment on the shared PostgreSQL and emulator.
    pub async fn new(name: &str) -> TestEnv {
        let shared = shared();
        let name = unique(name);
        let admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", shared.pg_port);
        let mut conn = {
            use sqlx::Connection;
            sqlx::PgConnection::connect(&admin_url)
                .await
                .expect("connect")
        };
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let database_url = format!("postgres://postgres@127.0.0.1:{}/{name}", shared.pg_port);
        Self::on(
            name,
            Infra {
                database_url,
                emulator_host: shared.emulator_host.clone(),
            },
        )
        .await
    }

    /// A test environment on infrastructure the test owns.
    pub async fn on(name: String, infra: Infra) -> TestEnv {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&infra.database_url)
            .await
            .expect("connect test database");
        outbox_worker::db::migrate(&pool).await.expect("migrate");
        let id = name.replace('_', "-");
        let topic = format!("projects/{PROJECT}/topics/t-{id}");
        let subscription = format!("projects/{PROJECT}/subscriptions/s-{id}");
        let endpoint = outbox_worker::pubsub::Endpoint {
            emulator_host: Some(infra.emulator_host.clone()),
        };
        create_topic_and_subscription(&endpoint, &topic, &subscription).await;
        let collector = Collector::start(endpoint, subscription.clone());
        TestEnv {
            name,
            database_url: infra.database_url,
            emulator_host: infra.emulator_host,
            topic,
            subscription,
            pool,
            collector,
        }
    }

    /// A test environment on its own PostgreSQL and emulator, for tests that
    /// stop, freeze or restart them (the shared ones serve other tests).
    pub async fn isolated(name: &str) -> (TestEnv, Postgres, Emulator) {
        let (pg, emulator) = tokio::try_join!(Postgres::start(), Emulator::start()).expect("infra");
        let database_url = pg.create_database(name).await.expect("database");
        let infra = Infra {
            database_url,
            emulator_host: emulator.host(),
        };
        (TestEnv::on(name.to_owned(), infra).await, pg, emulator)
    }

    /// Starts the real relay binary against this environment.
    pub fn spawn_relay(&self, extra: &[&str]) -> WorkerProcess {
        self.spawn_relay_with(extra, &[])
    }

    /// Starts the relay with extra flags and environment (later entries win).
    pub fn spawn_relay_with(&self, extra: &[&str], env: &[(&str, String)]) -> WorkerProcess {
        let port = devkit::free_port().expect("free port");
        let log = log_dir().join(format!("{}-relay-{port}.log", self.name));
        let mut args = vec!["relay"];
        args.extend_from_slice(extra);
        let mut all = vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("PUBSUB_TOPIC", self.topic.clone()),
            ("PUBSUB_EMULATOR_HOST", self.emulator_host.clone()),
            ("RETRY_MAX", "1s".to_owned()),
            ("PROBE_INTERVAL", "500ms".to_owned()),
            ("RUST_LOG", "info,outbox_worker=debug".to_owned()),
        ];
        all.extend(env.iter().cloned());
        WorkerProcess::spawn(&worker_binary(), &args, &all, port, log).expect("spawn relay")
    }

    /// Rows still pending in the outbox.
    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    /// Waits until at most `n` rows are pending (the relay is mid-stream).
    pub async fn wait_pending_at_most(&self, n: i64) {
        devkit::wait_for(&format!("at most {n} pending rows"), WAIT, || async {
            (self.pending().await <= n).then_some(())
        })
        .await
        .expect("relay makes progress");
    }

    /// Waits until every id arrived and the outbox is empty; checks per-key
    /// order and returns the number of duplicates.
    pub async fn expect_delivered(&self, ids: &[Uuid]) -> usize {
        let received = self
            .collector
            .wait_distinct(ids.len(), WAIT)
            .await
            .expect("all arrive");
        self.wait_drained().await;
        let duplicates = assert_all_arrived(ids, &received);
        assert_per_key_order(&received);
        duplicates
    }

    /// The dead-letter table: (message id, error), in id order.
    pub async fn dead_letters(&self) -> Vec<(Uuid, String)> {
        sqlx::query_as("SELECT message_id, error FROM outbox_dead_letter ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .expect("dead letters")
    }

    /// Waits until the outbox is empty.
    pub async fn wait_drained(&self) {
        devkit::wait_for("the outbox to drain", WAIT, || async {
            (self.pending().await == 0).then_some(())
        })
        .await
        .expect("outbox drained");
    }
}

pub async fn create_topic_and_subscription(
    endpoint: &outbox_worker::pubsub::Endpoint,
    topic: &str,
    subscription: &str,
) {
    let admin = outbox_worker::pubsub::topic_admin(endpoint)
        .await
        .expect("admin");
    admin
        .create_topic()
        .set_name(topic)
        .send()
        .await
        .expect("create topic");
    let subs = outbox_worker::pubsub::subscription_admin(endpoint)
        .await
        .expect("admin");
    subs.create_subscription()
        .set_name(subscription)
        .set_topic(topic)
        .set_ack_deadline_seconds(60)
        .set_enable_message_ordering(true)
        .send()
        .await
        .expect("create subscription");
}

/// The `outbox-worker` binary under test: this build's, or the one
/// `OUTBOX_WORKER_BIN` names (e.g. an earlier build, to show that a test
/// fails without a fix).
pub fn worker_binary() -> PathBuf {
    std::env::var_os("OUTBOX_WORKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_outbox-worker")))
}

/// Worker logs are kept under target/ for post-mortems.
pub fn log_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("worker-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// One row to insert.
#[derive(Clone, Debug, Default)]
pub struct NewRow {
    pub payload: Vec<u8>,
    pub ordering_key: Option<String>,
    pub attributes: Option<serde_json::Value>,
    pub topic: Option<String>,
}

/// Inserts rows in one transaction, in order; returns their message ids.
pub async fn insert(pool: &PgPool, rows: &[NewRow]) -> Vec<Uuid> {
    let mut tx = pool.begin().await.expect("begin");
    let mut ids = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(500) {
        let payloads: Vec<&[u8]> = chunk.iter().map(|r| r.payload.as_slice()).collect();
        let keys: Vec<Option<&str>> = chunk.iter().map(|r| r.ordering_key.as_deref()).collect();
        let attrs: Vec<Option<serde_json::Value>> =
            chunk.iter().map(|r| r.attributes.clone()).collect();
        let topics: Vec<Option<&str>> = chunk.iter().map(|r| r.topic.as_deref()).collect();
        let mut got: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO outbox (payload, ordering_key, attributes, topic) \
             SELECT p, k, a, tp FROM unnest($1::bytea[], $2::text[], $3::jsonb[], $4::text[]) WITH ORDINALITY AS t(p, k, a, tp, n) \
             ORDER BY n RETURNING message_id",
        )
        .bind(&payloads)
        .bind(&keys)
        .bind(&attrs)
        .bind(&topics)
        .fetch_all(&mut *tx)
        .await
        .expect("insert");
        ids.append(&mut got);
    }
    tx.commit().await.expect("commit");
    ids
}

/// `n` small rows with ordering keys `key-{i % keys}` and a payload `seq:{i}`.
pub fn numbered(start: usize, n: usize, keys: usize) -> Vec<NewRow> {
    (start..start + n)
        .map(|i| NewRow {
            payload: format!("{}:{i}", i % keys.max(1)).into_bytes(),
            ordering_key: (keys > 0).then(|| format!("key-{}", i % keys)),
            ..Default::default()
        })
        .collect()
}

/// Every inserted id arrived at least once; returns how many duplicates.
pub fn assert_all_arrived(expected: &[Uuid], received: &[devkit::Received]) -> usize {
    let mut seen = std::collections::HashMap::new();
    for m in received {
        *seen.entry(m.message_id.as_str()).or_insert(0usize) += 1;
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !seen.contains_key(id.to_string().as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} messages missing, e.g. {:?}",
        missing.len(),
        expected.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    seen.values().map(|n| n - 1).sum()
}

/// Per ordering key, the sequence numbers (payload `k:seq`) must never go
/// backwards, ignoring redeliveries of something already seen.
pub fn assert_per_key_order(received: &[devkit::Received]) {
    if let Some((key, seq, prev)) = order_breaks(received).first() {
        panic!("key {key:?}: message {seq} arrived after {prev}");
    }
}

/// Every (key, sequence number, the higher one before it) where a message
/// arrived (for the first time) after a later one of its key.
pub fn order_breaks(received: &[devkit::Received]) -> Vec<(String, i64, i64)> {
    let mut last: std::collections::HashMap<&str, i64> = Default::default();
    let mut seen = std::collections::HashSet::new();
    let mut breaks = Vec::new();
    for m in received {
        if !seen.insert(m.message_id.clone()) {
            continue;
        }
        let text = String::from_utf8_lossy(&m.data);
        let seq: i64 = text
            .rsplit(':')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected payload {text}"));
        let prev = last.entry(m.ordering_key.as_str()).or_insert(seq);
        if seq < *prev {
            breaks.push((m.ordering_key.clone(), seq, *prev));
        } else {
            *prev = seq;
        }
    }
    breaks
}

/// Fast election timings for tests (the defaults are 15s / 10s / 2s).
pub fn fast_election() -> Vec<(&'static str, String)> {
    vec![
        ("LEASE_DURATION", "4s".to_owned()),
        ("RENEW_DEADLINE", "3s".to_owned()),
        ("RETRY_PERIOD", "500ms".to_owned()),
        ("PUBLISH_TIMEOUT", "3s".to_owned()),
    ]
}

/// Whether a relay says it leads.
pub async fn is_leader(relay: &devkit::WorkerProcess) -> bool {
    relay.metric("outbox_is_leader").await == Some(1.0)
}
