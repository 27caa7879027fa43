//! Test 3: `kill -9` mid-stream, restart: everything arrives, duplicates only
//! from what was in flight, per-key order intact.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing() {
    let env = TestEnv::new("crash").await;
    let batch = 200usize;
    let depth = 3usize;
    let args = ["--batch-size", "200", "--pipeline-depth", "3"];
    let rows = numbered(0, 60_000, 20);
    let ids = insert(&env.pool, &rows).await;

    let mut relay = env.spawn_relay(&args);
    env.wait_pending_at_most(55_000).await;
    relay.kill().expect("kill -9");
    let pending = env.pending().await;
    assert!(
        pending > 0,
        "the relay finished before it was killed; the test proves nothing"
    );

    let relay = env.spawn_relay(&args);
    let duplicates = env.expect_delivered(&ids).await;
    println!(
        "kill -9 with {pending} rows pending: {duplicates} duplicates (bound {})",
        batch * depth
    );
    assert!(
        duplicates <= batch * depth,
        "{duplicates} duplicates, more than the {} rows that can be in flight",
        batch * depth
    );
    drop(relay);
}
