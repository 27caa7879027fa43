//! Inbox test 5: per-key order holds from the outbox to the processed inbox
//! rows across one relay restart (`kill -9`, so the relay republishes what
//! was in flight), with two library processors working at once.

use futures::future::BoxFuture;
use outbox_worker::app::{HandlerError, InboxMessage};
use sqlx::PgConnection;

use crate::harness::*;
use crate::inbox_support::*;

const KEYS: usize = 50;
const PER_KEY: usize = 200;

/// Appends (key, seq) to a log whose identity column is the processing order.
fn record<'a>(
    tx: &'a mut PgConnection,
    m: &'a InboxMessage,
) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        let seq: i64 = text
            .rsplit(':')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("unexpected payload {text:?}"))?;
        sqlx::query("INSERT INTO processing_log (ordering_key, seq) VALUES ($1, $2)")
            .bind(&m.ordering_key)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        Ok(())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_per_key_order_holds_end_to_end_across_a_relay_restart() {
    let ib = InboxEnv::new("inbox_order").await;
    let pool = &ib.env.pool;
    sqlx::query(
        "CREATE TABLE processing_log (pos BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         ordering_key TEXT, seq BIGINT NOT NULL)",
    )
    .execute(pool)
    .await
    .expect("create");
    let total = KEYS * PER_KEY;
    let rows = numbered(0, total, KEYS);
    let inbox = ib.spawn_inbox(&["--batch-size", "50"]);
    let handler = record
        as for<'a> fn(
            &'a mut PgConnection,
            &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>>;
    let (stop, tasks) = ib.process_in_background(handler, quick_config(), 2);

    // Small relay batches so that one key spans many publish requests.
    let relay_args = ["--batch-size", "97"];
    let mut relay = ib.env.spawn_relay(&relay_args);
    let (first, second) = rows.split_at(total / 2);
    for chunk in first.chunks(1000) {
        insert(pool, chunk).await;
    }
    ib.env.wait_pending_at_most((total / 4) as i64).await;
    relay.kill().expect("kill -9 the relay");
    let relay = ib.env.spawn_relay(&relay_args);
    for chunk in second.chunks(1000) {
        insert(pool, chunk).await;
    }

    ib.wait_stored(total as i64).await;
    devkit::wait_for("every row processed", WAIT, || async {
        (ib.processed().await == total as i64).then_some(())
    })
    .await
    .expect("processed");
    stop.cancel();
    for t in tasks {
        t.await.expect("processor");
    }

    // The inbox table: one row per message; per key, ids follow seq.
    let stored: Vec<(Option<String>, Vec<u8>)> =
        sqlx::query_as("SELECT ordering_key, payload FROM inbox ORDER BY id")
            .fetch_all(pool)
            .await
            .expect("read");
    assert_eq!(stored.len(), total);
    assert_in_order(
        "inbox ids",
        stored.iter().map(|(k, p)| {
            let text = String::from_utf8_lossy(p).into_owned();
            (
                k.clone(),
                text.rsplit(':')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(-1),
            )
        }),
    );

    // The processing order: each message once, per key in seq order.
    let log: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT ordering_key, seq FROM processing_log ORDER BY pos")
            .fetch_all(pool)
            .await
            .expect("read");
    assert_eq!(log.len(), total, "each message processed exactly once");
    assert_in_order("processing", log.into_iter());
    let duplicates = inbox.metric("inbox_duplicates_total").await.unwrap_or(0.0);
    println!("relay kill -9: {duplicates} republished messages absorbed by the inbox");
    drop(relay);
}

/// Per key, the sequence numbers strictly increase.
fn assert_in_order(what: &str, items: impl Iterator<Item = (Option<String>, i64)>) {
    let mut last: std::collections::HashMap<Option<String>, i64> = Default::default();
    for (key, seq) in items {
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(prev < seq, "{what}: key {key:?}: {seq} after {prev}");
        }
    }
}
