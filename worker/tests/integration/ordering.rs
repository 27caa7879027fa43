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
