//! A relay claims only while it holds leadership, at each claim: losing the
//! lock mid-term must not let two relays split a key's rows, and the fence a
//! new leader puts up against the previous one's claims looks at its own
//! database only.

use std::time::Duration;

use crate::harness::*;
use devkit::{WorkerProcess, wait_for};
use tokio_util::sync::CancellationToken;

async fn published(relays: &[WorkerProcess]) -> f64 {
    let mut total = 0.0;
    for relay in relays {
        total += relay
            .metric("outbox_messages_published_total")
            .await
            .unwrap_or(0.0);
    }
    total
}

/// Commits one numbered row of key `k` per transaction, 300 a second, until
/// `stop`; returns the message ids in commit order.
fn one_key_producer(
    pool: sqlx::PgPool,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<uuid::Uuid>> {
    tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_micros(3_333));
        let mut seq = 0usize;
        while !stop.is_cancelled() {
            tick.tick().await;
            let row = NewRow {
                payload: format!("k:{seq}").into_bytes(),
                ordering_key: Some("k".into()),
                ..Default::default()
            };
            ids.extend(insert(&pool, &[row]).await);
            seq += 1;
        }
        ids
    })
}

/// The leader's advisory-lock session ends (`pg_terminate_backend`, as an
/// administrator or a connection pooler might) while its pool stays healthy.
/// A standby takes the lock at once. The old leader must stop claiming at
/// its next claim, not at its next lock check (up to a retry period later),
/// or both relays publish rows of the same key at once. Each relay reaches
/// Pub/Sub over its own link, and the old leader's is the longer one at
/// that moment (relays on different nodes: 20 ms each way), so rows it
/// still publishes can arrive after later rows the new leader publishes:
/// the subscriber sees them out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_leaders_lock_session_never_splits_a_key() {
    let env = TestEnv::new("fence_terminate").await;
    let links = [
        devkit::Proxy::start(env.emulator_host.clone())
            .await
            .expect("proxy"),
        devkit::Proxy::start(env.emulator_host.clone())
            .await
            .expect("proxy"),
    ];
    let spawn = |link: &devkit::Proxy| {
        let mut vars = fast_election();
        vars.push(("PUBSUB_EMULATOR_HOST", link.addr()));
        env.spawn_relay_with(&[], &vars)
    };
    let relays = [spawn(&links[0]), spawn(&links[1])];
    let stop = CancellationToken::new();
    let producer = one_key_producer(env.pool.clone(), stop.clone());

    for round in 0..6 {
        let leader = wait_for("a leader", WAIT, || async {
            for (i, relay) in relays.iter().enumerate() {
                if is_leader(relay).await {
                    return Some(i);
                }
            }
            None
        })
        .await
        .expect("a leader");
        let before = published(&relays).await;
        wait_for("the relays to publish", WAIT, || async {
            (published(&relays).await >= before + 300.0).then_some(())
        })
        .await
        .expect("publishing");
        links[leader].delay(Some(Duration::from_millis(20)));
        let ended: Vec<i32> = sqlx::query_scalar(
            "WITH holder AS MATERIALIZED ( \
                 SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND pid <> pg_backend_pid()) \
             SELECT pid FROM holder WHERE pg_terminate_backend(pid)",
        )
        .fetch_all(&env.pool)
        .await
        .expect("terminate the lock session");
        let other = 1 - leader;
        let before = relays[other]
            .metric("outbox_messages_published_total")
            .await
            .unwrap_or(0.0);
        wait_for("the other relay to lead and publish", WAIT, || async {
            let now = relays[other]
                .metric("outbox_messages_published_total")
                .await
                .unwrap_or(0.0);
            (now >= before + 300.0).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relays[other].log()));
        links[leader].delay(None);
        println!("round {round}: ended lock session {ended:?} of relay {leader}");
    }
    stop.cancel();
    let ids = producer.await.expect("producer");
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive");
    assert_all_arrived(&ids, &received);
    let breaks = order_breaks(&received);
    assert!(
        breaks.is_empty(),
        "{} order breaks over {} messages of one key, e.g. {:?}",
        breaks.len(),
        ids.len(),
        &breaks[..breaks.len().min(5)]
    );
}

/// `CREATE DATABASE ... TEMPLATE` copies a database with its OIDs, so a
/// cloned database has an outbox table with the same OID as the original.
/// Row locks held in the clone must not make a relay of the original wait
/// forever for "a previous leader's claims".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_in_a_cloned_database_do_not_hold_up_a_new_leader() {
    let mut env = TestEnv::new("fence_twin").await;
    let (server, db) = env
        .database_url
        .rsplit_once('/')
        .map(|(server, db)| (server.to_owned(), db.to_owned()))
        .expect("database name");
    let admin_url = format!("{server}/postgres");
    let twin = format!("{db}_twin");
    env.pool.close().await;
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("admin");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{twin}\" TEMPLATE \"{db}\""
        )))
        .execute(&mut admin)
        .await
        .expect("clone the database");
    }
    env.pool = sqlx::PgPool::connect(&env.database_url)
        .await
        .expect("reconnect");
    let twin_pool = sqlx::PgPool::connect(&format!("{server}/{twin}"))
        .await
        .expect("connect to the clone");
    let oid = "SELECT 'outbox'::regclass::oid::bigint";
    let ours: i64 = sqlx::query_scalar(oid)
        .fetch_one(&env.pool)
        .await
        .expect("oid");
    let theirs: i64 = sqlx::query_scalar(oid)
        .fetch_one(&twin_pool)
        .await
        .expect("oid");
    assert_eq!(ours, theirs, "the clone's outbox has the same OID");

    // A transaction in the clone holds row locks on its outbox (a relay or
    // an application there), for longer than this test.
    let mut held = twin_pool.begin().await.expect("begin");
    sqlx::query("SELECT id FROM outbox FOR UPDATE")
        .execute(&mut *held)
        .await
        .expect("lock in the clone");

    let relay = env.spawn_relay(&[]);
    let ids = insert(&env.pool, &numbered(0, 100, 4)).await;
    let received = env
        .collector
        .wait_distinct(ids.len(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    assert_all_arrived(&ids, &received);
    held.rollback().await.expect("rollback");
}
