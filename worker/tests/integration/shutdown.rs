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
