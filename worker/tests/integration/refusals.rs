//! Rows Pub/Sub (or the relay) refuses: what is dead-lettered, with which
//! reason, and what keeps flowing meanwhile.

use std::time::Duration;

use crate::harness::*;
use serde_json::json;

/// An application sets the `message-id` attribute itself and leaves it
/// empty. Subscribers then cannot deduplicate (the inbox falls back to
/// Pub/Sub's id, which changes on every publish), so the row is refused
/// with a reason instead of being published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_message_id_attribute_is_dead_lettered() {
    let env = TestEnv::new("empty_message_id").await;
    let relay = env.spawn_relay(&[]);
    let rows = vec![
        NewRow {
            payload: b"k:0".to_vec(),
            ordering_key: Some("k".into()),
            ..Default::default()
        },
        NewRow {
            payload: b"k:1".to_vec(),
            ordering_key: Some("k".into()),
            attributes: Some(json!({"message-id": ""})),
            ..Default::default()
        },
        NewRow {
            payload: b"k:2".to_vec(),
            ordering_key: Some("k".into()),
            ..Default::default()
        },
    ];
    let ids = insert(&env.pool, &rows).await;
    env.wait_drained().await;
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}\n{}", relay.log());
    assert_eq!(dead[0].0, ids[1]);
    assert!(dead[0].1.contains("message-id"), "{}", dead[0].1);
    let received = env
        .collector
        .wait_distinct(2, WAIT)
        .await
        .expect("the others arrive");
    assert_eq!(assert_all_arrived(&[ids[0], ids[2]], &received), 0);

    // The application library refuses it when the row is written.
    let mut tx = env.pool.begin().await.expect("begin");
    let written = outbox_worker::app::OutboxMessage::new(b"x".to_vec())
        .attribute("message-id", "")
        .write(&mut tx)
        .await;
    assert!(
        matches!(
            written,
            Err(outbox_worker::app::OutboxError::EmptyMessageId)
        ),
        "{written:?}"
    );
}

/// Rows routed to 20 topics, once. A relay routes to many topics over its
/// life; each publisher holds a connection's worth of state and a
/// background task per ordering key, so idle ones must be let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_of_idle_routed_topics_are_let_go() {
    let env = TestEnv::new("idle_publishers").await;
    let endpoint = outbox_worker::pubsub::Endpoint {
        emulator_host: Some(env.emulator_host.clone()),
    };
    let admin = outbox_worker::pubsub::topic_admin(&endpoint)
        .await
        .expect("admin");
    let mut rows = Vec::new();
    for i in 0..20 {
        let topic = format!("{}-routed-{i}", env.topic);
        admin
            .create_topic()
            .set_name(&topic)
            .send()
            .await
            .expect("create topic");
        rows.push(NewRow {
            payload: format!("k{i}:0").into_bytes(),
            ordering_key: Some(format!("k{i}")),
            topic: Some(topic),
            ..Default::default()
        });
    }
    let relay = env.spawn_relay_with(&[], &[("PUBLISHER_IDLE_TIMEOUT", "2s".to_owned())]);
    insert(&env.pool, &rows).await;
    env.wait_drained().await;
    devkit::wait_for(
        "the routed topics' publishers to be let go",
        Duration::from_secs(30),
        || async {
            let publishers = relay.metric("outbox_topic_publishers").await?;
            (publishers == 0.0).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    // And a topic used again gets a publisher again.
    let ids = insert(&env.pool, &numbered(0, 10, 2)).await;
    env.expect_delivered(&ids).await;
}

/// Creates an AVRO schema (record `{a: string, n: int}`, JSON encoding) and
/// a topic that validates against it, through the emulator's REST API.
async fn schema_topic(env: &TestEnv, topic: &str) {
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/projects/{PROJECT}", env.emulator_host);
    let schema_id = format!("s-{}", env.name.replace('_', "-"));
    let definition = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"string"},{"name":"n","type":"int"}]}"#;
    let created = http
        .post(format!("{base}/schemas?schemaId={schema_id}"))
        .json(&json!({"type": "AVRO", "definition": definition}))
        .send()
        .await
        .expect("create schema");
    assert!(created.status().is_success(), "{:?}", created.text().await);
    let created = http
        .put(format!("http://{}/v1/{topic}", env.emulator_host))
        .json(&json!({"schemaSettings": {
            "schema": format!("projects/{PROJECT}/schemas/{schema_id}"),
            "encoding": "JSON"}}))
        .send()
        .await
        .expect("create topic");
    assert!(created.status().is_success(), "{:?}", created.text().await);
}

/// A topic validates messages against a schema, and one message of a
/// request does not match: Pub/Sub rejects the whole request with
/// INVALID_ARGUMENT. Only the message that fails when published alone is a
/// dead letter; the others of its request are published, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_invalid_message_does_not_dead_letter_its_whole_request() {
    let env = TestEnv::new("schema_reject").await;
    let topic = format!("{}-avro", env.topic);
    let subscription = format!("{}-avro", env.subscription);
    schema_topic(&env, &topic).await;
    let endpoint = outbox_worker::pubsub::Endpoint {
        emulator_host: Some(env.emulator_host.clone()),
    };
    outbox_worker::pubsub::subscription_admin(&endpoint)
        .await
        .expect("admin")
        .create_subscription()
        .set_name(&subscription)
        .set_topic(&topic)
        .set_enable_message_ordering(true)
        .send()
        .await
        .expect("subscription");
    let avro = devkit::Collector::start(endpoint, subscription);

    // Keyed and unkeyed rows in one claim; row 5 of key k lacks field `n`.
    let mut rows = Vec::new();
    for n in 0..10 {
        let payload = if n == 5 {
            json!({"a": "k"}).to_string()
        } else {
            json!({"a": "k", "n": n}).to_string()
        };
        rows.push(NewRow {
            payload: payload.into_bytes(),
            ordering_key: Some("k".into()),
            topic: Some(topic.clone()),
            ..Default::default()
        });
        rows.push(NewRow {
            payload: json!({"a": "none", "n": n}).to_string().into_bytes(),
            topic: Some(topic.clone()),
            ..Default::default()
        });
    }
    let ids = insert(&env.pool, &rows).await;
    let relay = env.spawn_relay(&[]);
    env.wait_drained().await;
    let dead = env.dead_letters().await;
    assert_eq!(
        dead.iter().map(|d| d.0).collect::<Vec<_>>(),
        vec![ids[10]],
        "only the invalid message is a dead letter: {dead:#?}\n{}",
        relay.log()
    );
    assert!(dead[0].1.contains("InvalidArgument"), "{}", dead[0].1);
    let received = avro
        .wait_distinct(19, WAIT)
        .await
        .expect("the valid messages arrive");
    let good: Vec<_> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 10)
        .map(|(_, id)| *id)
        .collect();
    assert_all_arrived(&good, &received);
    // Key k in order, by first arrival.
    let mut seen = std::collections::HashSet::new();
    let order: Vec<i64> = received
        .iter()
        .filter(|m| m.ordering_key == "k" && seen.insert(m.message_id.clone()))
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.data).expect("json");
            v["n"].as_i64().expect("n")
        })
        .collect();
    assert_eq!(
        order,
        vec![0, 1, 2, 3, 4, 6, 7, 8, 9],
        "key k arrived as {order:?}"
    );
}

/// The relay's service account may not publish to one routed topic
/// (PERMISSION_DENIED, from the emulator's IAM integration). Its rows are
/// retried a bounded number of times, then dead-lettered with the reason and
/// counted; the relay's own topic keeps flowing all along, although the
/// refused rows are the oldest and fill whole claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_refuses_forever_does_not_block_the_others() {
    let iam = devkit::IamStandIn::start().await.expect("iam");
    let (pg, emulator) = tokio::try_join!(
        devkit::Postgres::start(),
        devkit::Emulator::start_with_iam(&iam)
    )
    .expect("infra");
    let database_url = pg.create_database("refused").await.expect("database");
    let env = TestEnv::on(
        "refused".to_owned(),
        Infra {
            database_url,
            emulator_host: emulator.host(),
        },
    )
    .await;
    let forbidden = format!("{}-forbidden", env.topic);
    emulator.create_topic(&forbidden).await.expect("topic");
    iam.deny_publish(&forbidden);

    let refused: Vec<NewRow> = (0..30)
        .map(|i| NewRow {
            payload: format!("f:{i}").into_bytes(),
            ordering_key: Some("f".into()),
            topic: Some(forbidden.clone()),
            ..Default::default()
        })
        .collect();
    let refused_ids = insert(&env.pool, &refused).await;
    let ids = insert(&env.pool, &numbered(0, 100, 5)).await;
    let relay = env.spawn_relay_with(
        &["--batch-size", "10"],
        &[("MAX_PUBLISH_ATTEMPTS", "3".to_owned())],
    );
    let received = env
        .collector
        .wait_distinct(ids.len(), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    assert_all_arrived(&ids, &received);
    assert_per_key_order(&received);

    env.wait_drained().await;
    let dead = env.dead_letters().await;
    assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), refused_ids);
    for (_, error) in &dead {
        assert!(
            error.contains("PermissionDenied") && error.contains("3 attempts"),
            "{error}"
        );
    }
    assert_eq!(relay.metric("outbox_dead_letter_total").await, Some(30.0));
}
