//! Inbox test 4: a handler that fails on some messages: they are retried,
//! the others are processed, every effect happens once; a message that
//! always fails is parked with its error. Also: the outbox writer of the
//! library, and retention.

use std::time::Duration;

use futures::future::BoxFuture;
use outbox_worker::app::{HandlerError, InboxMessage, OutboxMessage, delete_processed};
use sqlx::PgConnection;

use crate::harness::*;
use crate::inbox_support::*;

const N: i64 = 1_000;

fn seq(m: &InboxMessage) -> i64 {
    m.attributes
        .get("seq")
        .and_then(|s| s.parse().ok())
        .unwrap_or(-1)
}

/// Records the effect, then fails on the first two attempts of every 10th
/// message and always on message 7 (after writing its effect, which the
/// rollback must undo).
fn handler<'a>(
    tx: &'a mut PgConnection,
    m: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        sqlx::query("INSERT INTO effects (message_id, seq) VALUES ($1, $2)")
            .bind(&m.message_id)
            .bind(seq(m))
            .execute(&mut *tx)
            .await?;
        if seq(m) == 7 {
            return Err("message 7 is poison".into());
        }
        if seq(m) % 10 == 0 && m.attempts < 2 {
            return Err(format!("transient failure {}", m.attempts + 1).into());
        }
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_processing_retries_failures_and_applies_effects_once() {
    let ib = InboxEnv::new("inbox_processing").await;
    let pool = &ib.env.pool;
    sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL, seq BIGINT NOT NULL)")
        .execute(pool)
        .await
        .expect("create");

    // Produce through the library, in the application's own transactions.
    let mut written = Vec::new();
    for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
        let mut tx = pool.begin().await.expect("begin");
        for i in chunk {
            let id = OutboxMessage::new(format!("payload {i}"))
                .ordering_key(format!("k{}", i % 5))
                .attribute("seq", i.to_string())
                .write(&mut tx)
                .await
                .expect("write");
            written.push(id);
        }
        tx.commit().await.expect("commit");
    }
    let relay = ib.env.spawn_relay(&[]);
    let inbox = ib.spawn_inbox(&[]);
    ib.wait_stored(N).await;

    let mut config = quick_config();
    config.max_attempts = 3;
    config.batch_size = 50;
    let handler = handler
        as for<'a> fn(
            &'a mut PgConnection,
            &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>>;
    let (stop, tasks) = ib.process_in_background(handler, config, 2);
    // Every row but the poisoned one gets processed; the poisoned one is
    // parked after 3 attempts. Rows after it on the same key wait behind it.
    devkit::wait_for("message 7 to be parked", WAIT, || async {
        let parked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM inbox WHERE parked_at IS NOT NULL")
                .fetch_one(pool)
                .await
                .ok()?;
        (parked == 1).then_some(())
    })
    .await
    .expect("parked");
    // The inbox worker's probe reports it, for the InboxRowsParked alert.
    devkit::wait_for("inbox_parked_rows = 1", WAIT, || async {
        (inbox.metric("inbox_parked_rows").await? == 1.0).then_some(())
    })
    .await
    .expect("the parked row is counted");
    let blocked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox WHERE ordering_key = 'k2' AND (attributes->>'seq')::int > 7",
    )
    .fetch_one(pool)
    .await
    .expect("count");
    devkit::wait_for("all other messages processed", WAIT, || async {
        let n = ib.processed().await;
        (n == N - 1 - blocked).then_some(())
    })
    .await
    .expect("processed");
    stop.cancel();
    for t in tasks {
        t.await.expect("processor");
    }

    // Effects: exactly once for each processed row, none for the parked
    // one or the rows waiting behind it on its key.
    let (effects, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT message_id) FROM effects")
            .fetch_one(pool)
            .await
            .expect("count");
    assert_eq!(effects, distinct, "an effect happened twice");
    assert_eq!(effects, N - 1 - blocked);
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inbox i WHERE (i.processed_at IS NOT NULL) <> \
            EXISTS (SELECT 1 FROM effects e WHERE e.message_id = i.message_id)",
    )
    .fetch_one(pool)
    .await
    .expect("count");
    assert_eq!(mismatched, 0, "processed_at and effects disagree");

    // Retries: every 10th message failed twice, then succeeded.
    let retried: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT attempts, last_error FROM inbox WHERE (attributes->>'seq')::int % 10 = 0 \
           AND processed_at IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .expect("read");
    assert!(!retried.is_empty());
    for (attempts, error) in &retried {
        assert_eq!(*attempts, 2);
        assert_eq!(error.as_deref(), Some("transient failure 2"));
    }
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM inbox WHERE parked_at IS NOT NULL")
            .fetch_one(pool)
            .await
            .expect("parked row");
    assert_eq!(attempts, 3);
    assert_eq!(error.as_deref(), Some("message 7 is poison"));

    // Retention: only processed rows older than the age go.
    sqlx::query(
        "UPDATE inbox SET processed_at = processed_at - interval '2 days' \
         WHERE processed_at IS NOT NULL AND (attributes->>'seq')::int < 100",
    )
    .execute(pool)
    .await
    .expect("age rows");
    let deleted = delete_processed(
        pool,
        &"inbox".parse().expect("name"),
        Duration::from_secs(86_400),
        7,
    )
    .await
    .expect("retention");
    let old_processed: i64 = sqlx::query_scalar("SELECT count(*) FROM effects WHERE seq < 100")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(deleted as i64, old_processed);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(left, N - old_processed);
    drop((relay, inbox));
}
