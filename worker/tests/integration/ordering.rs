//! Test 2: per-key order for 50 keys × 200 messages.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_for_50_keys_by_200_messages() {
    let env = TestEnv::new("ordering").await;
    // Small batches so that one key's messages span many batches and
    // publish requests in flight at once.
    let relay = env.spawn_relay(&["--batch-size", "97"]);
    let mut ids = Vec::new();
    // Committed in several transactions while the relay is running.
    for chunk in numbered(0, 10_000, 50).chunks(1000) {
        ids.extend(insert(&env.pool, chunk).await);
    }
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive");
    assert_eq!(assert_all_arrived(&ids, &received), 0, "no duplicates");
    assert_per_key_order(&received);
    drop(relay);
}

/// Ids are taken at insert, not at commit. A producer that writes a key's
/// next message only after the previous one committed must see them
/// published in that order, even when the first one's id is below rows the
/// relay already claimed: a claim may never skip it for a later row of its
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_published_before_the_next_message_of_its_key() {
    // Own emulator: this test freezes it.
    let (env, _pg, emulator) = TestEnv::isolated("late_order").await;
    let relay = env.spawn_relay(&["--batch-size", "10", "--pipeline-depth", "2"]);
    relay.wait_ready(WAIT).await.expect("relay ready");

    // The key's first message takes the lowest id and stays uncommitted.
    let mut first = env.pool.begin().await.expect("begin");
    sqlx::query("INSERT INTO outbox (payload, ordering_key) VALUES ('k:1', 'k')")
        .execute(&mut *first)
        .await
        .expect("insert the first message");

    // Two full claims of other rows, stuck in flight while Pub/Sub is frozen.
    emulator.pause().expect("SIGSTOP emulator");
    insert(&env.pool, &numbered(0, 20, 4)).await;
    devkit::wait_for("two claims in flight", WAIT, || async {
        let claims = relay.metric("outbox_batch_rows_count").await?;
        (claims >= 2.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));

    // The first message commits, then (and only then) the second is written.
    first.commit().await.expect("commit the first message");
    sqlx::query("INSERT INTO outbox (payload, ordering_key) VALUES ('k:2', 'k')")
        .execute(&env.pool)
        .await
        .expect("insert the second message");
    emulator.resume().expect("SIGCONT emulator");

    let received = env
        .collector
        .wait_distinct(22, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    let order: Vec<String> = received
        .iter()
        .filter(|m| m.ordering_key == "k")
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect();
    assert_eq!(
        order.first().map(String::as_str),
        Some("k:1"),
        "key k arrived as {order:?}"
    );
    assert_per_key_order(&received);
    drop(relay);
}
