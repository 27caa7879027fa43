//! Faults on the receiving side: a message the inbox table's own constraints
//! refuse, and application handlers that misbehave (swallow a failed
//! statement, hang, or meet payloads too large to hold a batch of).

use std::time::Duration;

use futures::future::BoxFuture;
use google_cloud_pubsub::model::Message;
use outbox_worker::app::{HandlerError, InboxMessage, InboxProcessor};
use sqlx::PgConnection;

use crate::harness::*;
use crate::inbox_support::*;

/// An application added a CHECK constraint to its inbox table. A message
/// that violates it (SQLSTATE 23514) is recorded in the dead-letter table
/// with the reason, and the messages around it are stored: the batch is not
/// retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_dead_letters_a_message_its_table_constraint_refuses() {
    let ib = InboxEnv::new("inbox_constraint").await;
    sqlx::query("ALTER TABLE inbox ADD CONSTRAINT payload_under_100_bytes CHECK (octet_length(payload) < 100)")
        .execute(&ib.env.pool)
        .await
        .expect("constraint");
    let inbox = ib.spawn_inbox(&[]);
    inbox.wait_ready(WAIT).await.expect("ready");
    let message = |id: &str, data: Vec<u8>| {
        Message::new()
            .set_data(data)
            .set_attributes([("message-id".to_owned(), id.to_owned())])
            .set_ordering_key("k")
    };
    devkit::pull::publish_raw(
        &endpoint(&ib.env),
        &ib.env.topic,
        vec![
            message("before", b"small".to_vec()),
            message("too-big", vec![b'x'; 200]),
            message("after", b"small".to_vec()),
        ],
    )
    .await
    .expect("publish");
    devkit::wait_for(
        "the two good messages stored",
        Duration::from_secs(30),
        || async { (ib.stored().await == 2).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", inbox.log()));
    let (id, error): (String, String) =
        sqlx::query_as("SELECT message_id, error FROM inbox_dead_letter")
            .fetch_one(&ib.env.pool)
            .await
            .expect("dead letter");
    assert_eq!(id, "too-big");
    assert!(error.contains("payload_under_100_bytes"), "{error}");
}

/// Inserts `n` inbox rows of `bytes` each (key `k`, message ids `m0`, ...),
/// as the inbox worker would have stored them.
async fn stored_rows(pool: &sqlx::PgPool, n: usize, bytes: usize) {
    for i in 0..n {
        sqlx::query("INSERT INTO inbox (message_id, payload, ordering_key) VALUES ($1, $2, 'k')")
            .bind(format!("m{i}"))
            .bind(vec![b'x'; bytes])
            .execute(pool)
            .await
            .expect("insert");
    }
}

type HandlerFn =
    for<'a> fn(&'a mut PgConnection, &'a InboxMessage) -> BoxFuture<'a, Result<(), HandlerError>>;

fn swallows_a_failed_statement<'a>(
    tx: &'a mut PgConnection,
    m: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        if m.message_id == "m1" {
            let _ignored = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
        }
        Ok(())
    })
}

fn hangs_on_m0<'a>(
    _tx: &'a mut PgConnection,
    m: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        if m.message_id == "m0" {
            std::future::pending::<()>().await;
        }
        Ok(())
    })
}

fn succeeds<'a>(
    _tx: &'a mut PgConnection,
    _m: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async { Ok(()) })
}

/// A handler that runs a statement that fails (division by zero), ignores
/// the error and returns `Ok` for message `m1`. Its transaction is aborted,
/// so the row cannot be marked processed: that is a failed attempt of `m1`
/// (counted, retried, eventually parked), not a rollback of the whole batch
/// that repeats forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_swallows_a_failed_statement_counts_an_attempt() {
    let env = TestEnv::new("handler_swallows").await;
    stored_rows(&env.pool, 3, 10).await;
    let handler = swallows_a_failed_statement as HandlerFn;
    let mut config = quick_config();
    config.max_attempts = 2;
    let processor = InboxProcessor::new(env.pool.clone(), config);
    let first = processor
        .process_batch(&handler)
        .await
        .expect("first batch");
    assert_eq!((first.processed, first.failed), (1, 1), "{first:?}");
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM inbox WHERE message_id = 'm1'")
            .fetch_one(&env.pool)
            .await
            .expect("m1");
    assert_eq!(attempts, 1);
    let error = error.unwrap_or_default();
    assert!(error.contains("a statement it ran failed"), "{error}");
}

/// A handler that never returns (a call to a service that hangs) must not
/// hold its batch, its rows and its connection forever: after the handler
/// timeout it is a failed attempt like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs_times_out_as_a_failed_attempt() {
    let env = TestEnv::new("handler_hangs").await;
    stored_rows(&env.pool, 2, 10).await;
    let handler = hangs_on_m0 as HandlerFn;
    let processor = InboxProcessor::new(env.pool.clone(), quick_config());
    let report = tokio::time::timeout(Duration::from_secs(20), processor.process_batch(&handler))
        .await
        .expect("a hanging handler held its batch for 20 s")
        .expect("batch");
    assert_eq!(report.failed, 1, "{report:?}");
    let error: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM inbox WHERE message_id = 'm0'")
            .fetch_one(&env.pool)
            .await
            .expect("m0");
    assert!(error.unwrap_or_default().contains("timed out"));
}

/// Ten payloads of 2 MB: a batch holds at most 8 MB of payloads (and at
/// least one row), however many rows `batch_size` allows, so a processor's
/// memory does not grow with the size of the messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_batches_are_bounded_by_bytes() {
    let env = TestEnv::new("processor_bytes").await;
    stored_rows(&env.pool, 10, 2_000_000).await;
    let handler = succeeds as HandlerFn;
    let processor = InboxProcessor::new(env.pool.clone(), quick_config());
    let mut batches = Vec::new();
    loop {
        let report = processor.process_batch(&handler).await.expect("batch");
        if report.claimed == 0 {
            break;
        }
        batches.push(report.claimed);
    }
    assert_eq!(batches.iter().sum::<usize>(), 10);
    assert!(
        batches.iter().all(|&rows| rows <= 4),
        "batches of {batches:?} rows of 2 MB"
    );
}
