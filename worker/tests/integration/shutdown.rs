//! Test 6: SIGTERM mid-stream exits 0 promptly and loses nothing.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_zero_and_loses_nothing() {
    let env = TestEnv::new("sigterm").await;
    let args = ["--batch-size", "200"];
    let ids = insert(&env.pool, &numbered(0, 60_000, 10)).await;

    let mut relay = env.spawn_relay(&args);
    env.wait_pending_at_most(55_000).await;
    let started = Instant::now();
    let status = relay
        .terminate(Duration::from_secs(15))
        .await
        .expect("exits after SIGTERM");
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}\n{}", relay.log());
    println!("SIGTERM to exit: {took:?}");
    assert!(
        env.pending().await > 0,
        "drained before SIGTERM; the test proves nothing"
    );
    // No claim survives the exit: every pending row can be locked at once.
    let locked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT id FROM outbox FOR UPDATE NOWAIT) t")
            .fetch_one(&env.pool)
            .await
            .expect("no row is still locked");
    assert!(locked > 0);

    let relay = env.spawn_relay(&args);
    let duplicates = env.expect_delivered(&ids).await;
    println!("SIGTERM mid-stream: {duplicates} duplicates");
    drop(relay);
}

/// Large payloads are read and published one by one inside the claim, and the
/// claim waits for Pub/Sub after every `--batch-bytes` of them. When Pub/Sub
/// hangs there, the publish timeout ends the wait (the client's own, and the
/// relay's deadline behind it), so SIGTERM still ends the relay; the rows stay
/// for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_pubsub_hangs_on_large_payloads_exits_zero() {
    // Own emulator: this test freezes it.
    let (env, _pg, emulator) = TestEnv::isolated("large_hang").await;
    // 1 MiB per claim of 10 rows: rows above 100 KiB are read one by one.
    let args = [
        "--batch-size",
        "10",
        "--batch-bytes",
        "1048576",
        "--publish-timeout",
        "1s",
    ];
    let mut relay = env.spawn_relay(&args);
    relay.wait_ready(WAIT).await.expect("relay ready");

    emulator.pause().expect("SIGSTOP emulator");
    let rows: Vec<NewRow> = (0..10)
        .map(|i| NewRow {
            payload: vec![b'a' + i as u8; 300 * 1024],
            ..Default::default()
        })
        .collect();
    let ids = insert(&env.pool, &rows).await;
    devkit::wait_for("a claim of large rows", WAIT, || async {
        let claims = relay.metric("outbox_batch_rows_count").await?;
        (claims >= 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));

    let started = Instant::now();
    let status = relay
        .terminate(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    println!(
        "SIGTERM to exit while Pub/Sub hangs: {:?}",
        started.elapsed()
    );
    assert!(status.success(), "exit status {status:?}\n{}", relay.log());
    assert_eq!(env.pending().await, 10, "every row stays for the next run");

    emulator.resume().expect("SIGCONT emulator");
    let relay = env.spawn_relay(&args);
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    assert_all_arrived(&ids, &received);
    env.wait_drained().await;
    drop(relay);
}
