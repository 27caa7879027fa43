//! Test 5: rows that can never be published go to the dead-letter table with a
//! readable error; the rows around them are delivered.

use crate::harness::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublishable_rows_are_dead_lettered_and_the_rest_flow() {
    let env = TestEnv::new("deadletter").await;
    let other_topic = format!(
        "projects/{PROJECT}/topics/other-{}",
        env.name.replace('_', "-")
    );
    let other_sub = format!(
        "projects/{PROJECT}/subscriptions/other-{}",
        env.name.replace('_', "-")
    );
    let endpoint = outbox_worker::pubsub::Endpoint {
        emulator_host: Some(env.emulator_host.clone()),
    };
    create_topic_and_subscription(&endpoint, &other_topic, &other_sub).await;
    let other = devkit::Collector::start(endpoint, other_sub);

    let good = |i: usize| NewRow {
        payload: format!("k:{i}").into_bytes(),
        ordering_key: Some("k".into()),
        ..Default::default()
    };
    let bad = vec![
        (
            NewRow {
                payload: vec![7u8; 10_500_000],
                ordering_key: Some("k".into()),
                ..Default::default()
            },
            "message too large",
        ),
        (
            NewRow {
                payload: b"x".to_vec(),
                attributes: Some(json!({"count": 3})),
                ..Default::default()
            },
            "value of \"count\" must be a string, got a number",
        ),
        (
            NewRow {
                payload: b"x".to_vec(),
                attributes: Some(json!(["not", "an", "object"])),
                ..Default::default()
            },
            "expected a JSON object of strings, got an array",
        ),
        (
            NewRow {
                payload: b"x".to_vec(),
                topic: Some("no-such-topic".into()),
                ..Default::default()
            },
            "NotFound",
        ),
    ];
    let mut rows = Vec::new();
    for (i, (row, _)) in bad.iter().enumerate() {
        rows.push(good(2 * i));
        rows.push(row.clone());
    }
    rows.push(good(100));
    rows.push(NewRow {
        payload: b"routed".to_vec(),
        topic: Some(
            other_topic
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        ..Default::default()
    });
    let ids = insert(&env.pool, &rows).await;

    let relay = env.spawn_relay(&[]);
    let received = env
        .collector
        .wait_distinct(bad.len() + 1, WAIT)
        .await
        .expect("good rows arrive");
    other
        .wait_distinct(1, WAIT)
        .await
        .expect("routed row arrives on its topic");
    env.wait_drained().await;
    assert_per_key_order(&received);
    let good_ids: Vec<_> = ids.iter().step_by(2).copied().collect();
    assert_eq!(assert_all_arrived(&good_ids[..bad.len() + 1], &received), 0);

    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), bad.len(), "{dead:#?}");
    for (i, ((id, error), (_, expected))) in dead.iter().zip(&bad).enumerate() {
        assert_eq!(*id, ids[2 * i + 1]);
        assert!(
            error.contains(expected),
            "row {i}: {error:?} lacks {expected:?}"
        );
    }
    // The dead-lettered payload is kept intact for a replay.
    let size: i32 = sqlx::query_scalar(
        "SELECT octet_length(payload) FROM outbox_dead_letter WHERE message_id = $1",
    )
    .bind(ids[1])
    .fetch_one(&env.pool)
    .await
    .expect("payload kept");
    assert_eq!(size, 10_500_000);
    assert_eq!(
        relay.metric("outbox_dead_letter_total").await,
        Some(bad.len() as f64)
    );
}
