//! Test 4: the database restarts and the emulator goes away mid-stream; the
//! relay recovers by itself (same process) and nothing is lost.

use crate::harness::*;
use devkit::wait_for;
use std::time::Duration;

async fn wait_not_ready(relay: &devkit::WorkerProcess, component: &str) {
    wait_for(
        &format!("readyz to report {component} failing"),
        WAIT,
        || async {
            relay
                .get("/readyz")
                .await
                .filter(|(s, b)| *s == 503 && b.contains(component))
                .map(|_| ())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    wait_ready_metric(relay, 0.0).await;
}

/// `outbox_ready` (what the readiness alert reads) follows `/readyz`.
async fn wait_ready_metric(relay: &devkit::WorkerProcess, value: f64) {
    wait_for(&format!("outbox_ready = {value}"), WAIT, || async {
        (relay.metric("outbox_ready").await? == value).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_and_emulator_outage_lose_nothing() {
    let (env, mut pg, mut emulator) = TestEnv::isolated("outage").await;
    let relay = env.spawn_relay(&["--batch-size", "100"]);
    let pid = relay.pid();
    let mut ids = Vec::new();

    // 1. The database restarts mid-stream.
    ids.extend(insert(&env.pool, &numbered(0, 20_000, 10)).await);
    env.collector
        .wait_distinct(1_000, WAIT)
        .await
        .expect("publishing");
    pg.stop().expect("stop postgres");
    wait_not_ready(&relay, "database").await;
    pg.restart().await.expect("start postgres");
    relay
        .wait_ready(WAIT)
        .await
        .expect("ready after the database came back");
    wait_ready_metric(&relay, 1.0).await;
    ids.extend(insert(&env.pool, &numbered(20_000, 1_000, 10)).await);
    env.collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive after db restart");

    // 2. The emulator freezes mid-stream (connections hang), then thaws.
    ids.extend(insert(&env.pool, &numbered(21_000, 20_000, 10)).await);
    env.collector
        .wait_distinct(ids.len() - 19_000, WAIT)
        .await
        .expect("publishing");
    emulator.pause().expect("SIGSTOP");
    wait_not_ready(&relay, "pubsub").await;
    emulator.resume().expect("SIGCONT");
    env.collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive after the freeze");

    // 3. The emulator dies (connections refused) while rows are written, and a
    //    new one starts on the same port. It starts empty: topics are recreated,
    //    as an operator would. Everything published before was received
    //    before the kill, so the comparison stays exact.
    emulator.kill().expect("kill emulator");
    let during = insert(&env.pool, &numbered(41_000, 2_000, 10)).await;
    wait_not_ready(&relay, "pubsub").await;
    assert!(
        env.pending().await > 0,
        "rows wait in the outbox while Pub/Sub is down"
    );
    // Freeze the relay while the topic and subscription are recreated, so that
    // it cannot publish into a topic that has no subscription yet.
    relay.pause().expect("SIGSTOP relay");
    emulator.restart().await.expect("restart emulator");
    create_topic_and_subscription(&emulator.endpoint(), &env.topic, &env.subscription).await;
    relay.resume().expect("SIGCONT relay");
    // The collector reconnects to the new emulator by itself.
    ids.extend(during);
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("rows written during the outage arrive");
    env.wait_drained().await;
    let duplicates = assert_all_arrived(&ids, &received);
    println!(
        "outages: {duplicates} duplicates across {} messages",
        ids.len()
    );
    assert_per_key_order(&received);
    assert_eq!(relay.pid(), pid, "the relay recovered without restarting");
    relay
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready at the end");
}
