//! The relay's LISTEN connection under a steady load: it must keep reading
//! its notifications while it is busy relaying, or PostgreSQL's NOTIFY queue
//! (8 GB, shared by the whole cluster) fills up, and from then on every
//! transaction that inserts into the outbox fails.

use std::time::Duration;

use crate::harness::*;
use tokio_util::sync::CancellationToken;

/// Notifications on the relay's channel that the server has queued and the
/// relay's listening backend is not reading, and whether that backend is
/// blocked writing them to a full socket.
async fn notify_backlog(pool: &sqlx::PgPool) -> (f64, i64) {
    let usage: f64 = sqlx::query_scalar("SELECT pg_notification_queue_usage()")
        .fetch_one(pool)
        .await
        .expect("queue usage");
    let blocked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event = 'ClientWrite' AND application_name LIKE 'outbox-worker%'",
    )
    .fetch_one(pool)
    .await
    .expect("wait events");
    (usage, blocked)
}

/// Commits one row per transaction, as fast as one connection can, until
/// `stop`; returns how many.
fn steady_load(pool: sqlx::PgPool, stop: CancellationToken) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.is_cancelled() {
            sqlx::query("INSERT INTO outbox (payload, ordering_key) VALUES ($1, 'load')")
                .bind(format!("load:{n}").into_bytes())
                .execute(&pool)
                .await
                .expect("insert");
            n += 1;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_load_does_not_back_up_the_notify_queue() {
    // Own PostgreSQL: the NOTIFY queue is shared by every database of a cluster.
    let (env, _pg, _emulator) = TestEnv::isolated("notify_load").await;
    let relay = env.spawn_relay(&[]);
    relay.wait_ready(WAIT).await.expect("relay ready");

    let stop = CancellationToken::new();
    let load = steady_load(env.pool.clone(), stop.clone());
    devkit::wait_for("the relay to publish under load", WAIT, || async {
        let published = relay.metric("outbox_messages_published_total").await?;
        (published >= 2_000.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));

    // What a day at 2,000 transactions/s sends, in one go: 32 MB of
    // notifications on the relay's channel, more than the socket buffers
    // between the server and the relay hold.
    sqlx::query(
        "SELECT pg_notify('outbox_relay', repeat('x', 7990) || i) FROM generate_series(1, 4000) i",
    )
    .execute(&env.pool)
    .await
    .expect("notify");

    // While the load goes on, the relay reads them all.
    let drained = devkit::wait_for(
        "the NOTIFY queue to empty while the load goes on",
        Duration::from_secs(30),
        || async {
            let (usage, blocked) = notify_backlog(&env.pool).await;
            (usage == 0.0 && blocked == 0).then_some(())
        },
    )
    .await;
    let (usage, blocked) = notify_backlog(&env.pool).await;
    let still_loading = !load.is_finished();
    stop.cancel();
    let committed = load.await.expect("load");
    assert!(still_loading, "the load stopped early");
    drained.unwrap_or_else(|e| {
        panic!(
            "{e:#}: queue usage {usage}, {blocked} relay backend(s) waiting in ClientWrite, \
             {committed} rows committed meanwhile"
        )
    });
    env.wait_drained().await;
}
