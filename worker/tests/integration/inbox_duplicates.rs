//! Inbox test 2: the same message published twice (same `message-id`) gives
//! one inbox row and the duplicate counter says 1; a message PostgreSQL
//! cannot store (NUL in an attribute) is dead-lettered and acknowledged
//! without stalling the rest; a message without `message-id` is keyed by
//! Pub/Sub's messageId; SIGTERM exits 0 with nothing left unacknowledged.

use std::time::Duration;

use google_cloud_pubsub::model::Message;
use sqlx::Row;

use crate::harness::*;
use crate::inbox_support::*;

fn message(data: &str, attrs: &[(&str, &str)], key: &str) -> Message {
    Message::new()
        .set_data(data.as_bytes().to_vec())
        .set_attributes(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .set_ordering_key(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_dedups_dead_letters_and_keeps_going() {
    // Unordered: the emulator's unary pull (used to show that nothing is left
    // unacknowledged) fails on ordered subscriptions.
    let ib = InboxEnv::with_ordering("inbox_dup", false).await;
    let mut inbox = ib.spawn_inbox(&[]);
    inbox.wait_ready(WAIT).await.expect("ready");
    let endpoint = endpoint(&ib.env);

    let first = devkit::pull::publish_raw(
        &endpoint,
        &ib.env.topic,
        vec![message("order 1", &[("message-id", "dup-1")], "k")],
    )
    .await
    .expect("publish");
    ib.wait_stored(1).await;
    // The same message again (a producer retry), then a poisoned one, then
    // one without a message-id attribute, all on the same key: the last
    // one is stored only if the poisoned one did not stall the key.
    let rest = devkit::pull::publish_raw(
        &endpoint,
        &ib.env.topic,
        vec![
            message("order 1", &[("message-id", "dup-1")], "k"),
            message("bad", &[("message-id", "nul-1"), ("note", "a\0b")], "k"),
            message("no id", &[("type", "x")], "k"),
        ],
    )
    .await
    .expect("publish");
    ib.wait_stored(2).await;

    let rows = sqlx::query("SELECT message_id, pubsub_message_id, payload FROM inbox ORDER BY id")
        .fetch_all(&ib.env.pool)
        .await
        .expect("read");
    let got: Vec<(String, String, Vec<u8>)> = rows
        .iter()
        .map(|r| {
            (
                r.get("message_id"),
                r.get("pubsub_message_id"),
                r.get("payload"),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("dup-1".to_owned(), first[0].clone(), b"order 1".to_vec()),
            (rest[2].clone(), rest[2].clone(), b"no id".to_vec()),
        ],
        "one row for the duplicate, the un-attributed message keyed by Pub/Sub's id"
    );

    devkit::wait_for("the dead-letter row", WAIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox_dead_letter")
            .fetch_one(&ib.env.pool)
            .await
            .ok()?;
        (n >= 1).then_some(())
    })
    .await
    .expect("dead-lettered");
    let dead = sqlx::query(
        "SELECT message_id, attributes, ordering_key, payload, error FROM inbox_dead_letter",
    )
    .fetch_all(&ib.env.pool)
    .await
    .expect("read");
    assert_eq!(dead.len(), 1, "the poisoned message is dead-lettered");
    let d = &dead[0];
    assert_eq!(d.get::<String, _>("message_id"), "nul-1");
    assert_eq!(d.get::<Vec<u8>, _>("payload"), b"bad");
    let attributes: String = d.get("attributes");
    assert!(attributes.contains(r"a\u0000b"), "{attributes}");
    let error: String = d.get("error");
    assert!(error.contains("attribute \"note\""), "{error}");

    let duplicates = devkit::wait_for("the duplicate counter", WAIT, || async {
        inbox
            .metric("inbox_duplicates_total")
            .await
            .filter(|n| *n >= 1.0)
    })
    .await
    .expect("metric");
    assert_eq!(duplicates, 1.0);
    assert_eq!(inbox.metric("inbox_dead_letter_total").await, Some(1.0));
    assert_eq!(inbox.metric("inbox_messages_stored_total").await, Some(2.0));

    let status = inbox
        .terminate(Duration::from_secs(20))
        .await
        .expect("exits");
    assert!(status.success(), "exit status {status}");
    // Everything was acknowledged, the dead-lettered message included:
    // nothing is left to redeliver.
    let left = devkit::pull::rest_peek(&ib.env.emulator_host, &ib.subscription)
        .await
        .expect("peek");
    assert_eq!(left, 0, "{left} messages were not acknowledged");
}
