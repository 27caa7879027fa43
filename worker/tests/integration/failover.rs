//! Leader election with the `postgres` backend, with real processes: crash,
//! graceful handover, network partition, and repeated kill/restart cycles.

use crate::harness::*;
use devkit::{WorkerProcess, wait_for};
use std::time::{Duration, Instant};

async fn published(relay: &WorkerProcess) -> f64 {
    relay
        .metric("outbox_messages_published_total")
        .await
        .unwrap_or(0.0)
}

/// Waits until exactly one of the two leads; returns (leader, standby) indexes.
async fn elected(relays: &[WorkerProcess; 2]) -> (usize, usize) {
    wait_for("one leader among two relays", WAIT, || async {
        match (is_leader(&relays[0]).await, is_leader(&relays[1]).await) {
            (true, false) => Some((0, 1)),
            (false, true) => Some((1, 0)),
            _ => None,
        }
    })
    .await
    .expect("a leader")
}

/// Commits `n` rows in small transactions, in the background.
fn produce(
    env: &TestEnv,
    start: usize,
    n: usize,
    keys: usize,
) -> tokio::task::JoinHandle<Vec<uuid::Uuid>> {
    let pool = env.pool.clone();
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(n);
        for chunk in numbered(start, n, keys).chunks(50) {
            ids.extend(insert(&pool, chunk).await);
        }
        ids
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_fails_over_to_the_standby() {
    let env = TestEnv::new("failover_kill").await;
    let args = [
        "--batch-size",
        "100",
        "--pipeline-depth",
        "1",
        "--liveness-timeout",
        "9s",
    ];
    let mut relays = [
        env.spawn_relay_with(&args, &fast_election()),
        env.spawn_relay_with(&args, &fast_election()),
    ];
    let (leader, standby) = elected(&relays).await;
    relays[standby]
        .wait_ready(WAIT)
        .await
        .expect("the standby is ready while idle");
    assert_eq!(
        published(&relays[standby]).await,
        0.0,
        "the standby stays idle"
    );
    // Alive, too: /healthz stays green past the liveness timeout (9s here).
    tokio::time::sleep(Duration::from_millis(9500)).await;
    assert_eq!(
        relays[standby].get("/healthz").await.map(|r| r.0),
        Some(200),
        "standby liveness"
    );
    assert_eq!(
        relays[leader].get("/healthz").await.map(|r| r.0),
        Some(200),
        "idle leader liveness"
    );

    let mut ids = insert(&env.pool, &numbered(0, 40_000, 20)).await;
    env.wait_pending_at_most(35_000).await;
    relays[leader].kill().expect("kill -9");
    let killed = Instant::now();
    wait_for("the standby to publish", Duration::from_secs(5), || async {
        (published(&relays[standby]).await > 0.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relays[standby].log()));
    println!(
        "kill -9: standby published {:?} after the kill",
        killed.elapsed()
    );

    ids.extend(insert(&env.pool, &numbered(40_000, 1_000, 20)).await);
    let duplicates = env.expect_delivered(&ids).await;
    println!("kill -9 failover: {duplicates} duplicates (one batch is 100)");
    assert!(
        duplicates <= 100,
        "{duplicates} duplicates, more than one batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_leader_hands_over_at_once() {
    let env = TestEnv::new("failover_term").await;
    let mut relays = [
        env.spawn_relay_with(&[], &fast_election()),
        env.spawn_relay_with(&[], &fast_election()),
    ];
    let (leader, standby) = elected(&relays).await;
    let producer = produce(&env, 0, 20_000, 10);
    env.collector
        .wait_distinct(2_000, WAIT)
        .await
        .expect("flowing");

    let sent = Instant::now();
    let status = relays[leader]
        .terminate(Duration::from_secs(15))
        .await
        .expect("exits");
    let exited = sent.elapsed();
    assert!(status.success(), "{status:?}");
    wait_for("the standby to lead", WAIT, || async {
        is_leader(&relays[standby]).await.then_some(())
    })
    .await
    .expect("standby leads");
    let handover = sent.elapsed();
    println!("SIGTERM: leader exited after {exited:?}; standby leading {handover:?} after SIGTERM");
    assert!(
        handover < Duration::from_secs(5),
        "handover took {handover:?}: it waited for expiry"
    );

    let ids = producer.await.expect("producer");
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive");
    assert_all_arrived(&ids, &received);
    assert_per_key_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_steps_down_and_comes_back_as_standby() {
    let env = TestEnv::new("failover_partition").await;
    let upstream = env
        .database_url
        .trim_start_matches("postgres://postgres@")
        .split('/')
        .next()
        .expect("host:port")
        .to_owned();
    let proxy = devkit::Proxy::start(upstream.clone()).await.expect("proxy");
    let proxied_url = env
        .database_url
        .replace(&upstream, &format!("127.0.0.1:{}", proxy.port()));

    // The first relay goes through the proxy and becomes leader; the second
    // connects directly and stands by.
    let mut env_a = fast_election();
    env_a.push(("DATABASE_URL", proxied_url));
    let a = env.spawn_relay_with(&["--batch-size", "100"], &env_a);
    wait_for("relay A to lead", WAIT, || async {
        is_leader(&a).await.then_some(())
    })
    .await
    .expect("A leads");
    let b = env.spawn_relay_with(&["--batch-size", "100"], &fast_election());
    b.wait_ready(WAIT).await.expect("B ready");

    let mut ids = insert(&env.pool, &numbered(0, 20_000, 10)).await;
    env.wait_pending_at_most(18_000).await;
    proxy.cut();
    let cut = Instant::now();
    wait_for("A to step down", WAIT, || async {
        (!is_leader(&a).await).then_some(())
    })
    .await
    .expect("A steps down");
    let stepped_down = cut.elapsed();
    let a_published = published(&a).await;
    wait_for("B to lead", WAIT, || async {
        is_leader(&b).await.then_some(())
    })
    .await
    .expect("B leads");
    let b_leads = cut.elapsed();
    assert!(
        stepped_down < b_leads,
        "A stepped down after {stepped_down:?}, B led after {b_leads:?}: two leaders at once"
    );
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("B delivers the rest");
    println!(
        "partition: A stepped down after {stepped_down:?}, B leading after {b_leads:?}, all delivered after {:?}",
        cut.elapsed()
    );
    assert_eq!(
        published(&a).await,
        a_published,
        "A published nothing after stepping down"
    );

    proxy.heal();
    // A reconnects and stands by: it neither leads nor publishes while B does.
    wait_for("A to be ready again", WAIT, || async {
        a.get("/readyz")
            .await
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    })
    .await
    .expect("A ready");
    ids.extend(insert(&env.pool, &numbered(20_000, 2_000, 10)).await);
    let received_all = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .expect("all arrive");
    assert!(
        is_leader(&b).await && !is_leader(&a).await,
        "A came back as a second leader"
    );
    assert_eq!(
        published(&a).await,
        a_published,
        "A published after the link healed"
    );
    assert_all_arrived(&ids, &received_all);
    assert_per_key_order(&received_all);
    drop(received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kill_restart_cycles_lose_nothing() {
    let env = TestEnv::new("failover_cycles").await;
    let args = ["--batch-size", "100"];
    let mut relays = [
        env.spawn_relay_with(&args, &fast_election()),
        env.spawn_relay_with(&args, &fast_election()),
    ];
    let producer = produce(&env, 0, 30_000, 10);
    for cycle in 0..10 {
        let (leader, _) = elected(&relays).await;
        let before = published(&relays[leader]).await;
        wait_for("the leader to publish", WAIT, || async {
            (published(&relays[leader]).await > before).then_some(())
        })
        .await
        .expect("leader publishes");
        relays[leader].kill().expect("kill -9");
        relays[leader] = env.spawn_relay_with(&args, &fast_election());
        println!("cycle {cycle}: killed relay {leader} and started a new one");
    }
    let ids = producer.await.expect("producer");
    let duplicates = env.expect_delivered(&ids).await;
    println!(
        "10 kill/restart cycles: {duplicates} duplicates over {} messages",
        ids.len()
    );
    // Each kill may repeat what was in flight: 3 batches of 100 by default.
    assert!(duplicates <= 10 * 3 * 100, "{duplicates} duplicates");
}
