//! Claims that wait on Pub/Sub: large payloads, slow links, answers that come
//! late. A claim must never be overtaken by a later one, must keep the relay
//! live while it makes progress, must come back smaller after timing out, and
//! must not be killed by the server while it legitimately waits.

use std::time::{Duration, Instant};

use crate::harness::*;

/// A row of key `k` whose payload is `bytes` of filler then `:seq`, so that
/// the order checks can read its sequence number.
fn large(seq: usize, bytes: usize) -> NewRow {
    let mut payload = vec![b'x'; bytes];
    payload.extend_from_slice(format!(":{seq}").as_bytes());
    NewRow {
        payload,
        ordering_key: Some("k".into()),
        ..Default::default()
    }
}

/// Per-key order by first arrival, and every row arrived.
async fn expect_in_order(env: &TestEnv, ids: &[uuid::Uuid], relay: &devkit::WorkerProcess) {
    let received = env
        .collector
        .wait_distinct(ids.len(), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    assert_all_arrived(ids, &received);
    assert_per_key_order(&received);
}

/// A claim reads large payloads one at a time and waits for Pub/Sub after
/// every `--batch-bytes` of them. Here one key's payloads of 1 MB cross a
/// 2 MB/s link: each request (8 payloads) is answered within the publish
/// timeout (5 s), but the claim's 25 MB take longer than it waits (publish
/// timeout + 5 s), so it stops publishing. Its unsent rows stay locked until
/// the claim is finished; the next claim (`SKIP LOCKED`) must not publish
/// later rows of their key meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_claim_of_large_payloads_is_not_overtaken() {
    let (env, _pg, emulator) = TestEnv::isolated("abandoned_claim").await;
    let link = devkit::Proxy::start(emulator.host()).await.expect("proxy");
    let relay = env.spawn_relay_with(
        &["--batch-size", "30", "--batch-bytes", "25000000"],
        &[
            ("PUBSUB_EMULATOR_HOST", link.addr()),
            ("PUBLISH_TIMEOUT", "5s".to_owned()),
        ],
    );
    relay.wait_ready(WAIT).await.expect("relay ready");
    link.throttle(Some(2_000_000));
    let rows: Vec<NewRow> = (0..40).map(|i| large(i, 1_000_000)).collect();
    let ids = insert(&env.pool, &rows).await;
    expect_in_order(&env, &ids, &relay).await;
}

/// Watches `/healthz` until `done` resolves; returns the first failure.
async fn healthz_failures_until<F: std::future::Future>(
    relay: &devkit::WorkerProcess,
    done: F,
) -> (F::Output, Option<String>) {
    tokio::pin!(done);
    let mut failure = None;
    loop {
        tokio::select! {
            out = &mut done => return (out, failure),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if let Some((status, body)) = relay.get("/healthz").await
                    && status != 200
                    && failure.is_none()
                {
                    failure = Some(body);
                }
            }
        }
    }
}

/// One claim of 24 payloads of 1 MB over a 2 MB/s link publishes for about
/// 12 s, longer than the liveness timeout (8 s); every payload is answered
/// well within the publish timeout. `/healthz` must stay green while the
/// publishing progresses, or the kubelet kills a working relay, the claim
/// starts over, and it never finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_over_a_slow_link_keep_the_relay_live() {
    let (env, _pg, emulator) = TestEnv::isolated("slow_link_live").await;
    let link = devkit::Proxy::start(emulator.host()).await.expect("proxy");
    link.throttle(Some(2_000_000));
    let relay = env.spawn_relay_with(
        &["--batch-bytes", "1000000"],
        &[
            ("PUBSUB_EMULATOR_HOST", link.addr()),
            ("PUBLISH_TIMEOUT", "2s".to_owned()),
            ("LIVENESS_TIMEOUT", "8s".to_owned()),
        ],
    );
    relay.wait_ready(WAIT).await.expect("relay ready");
    let rows: Vec<NewRow> = (0..24).map(|i| large(i, 1_000_000)).collect();
    let ids = insert(&env.pool, &rows).await;
    let started = Instant::now();
    let (_, failure) = healthz_failures_until(&relay, expect_in_order(&env, &ids, &relay)).await;
    println!("24 MB over a 2 MB/s link in {:?}", started.elapsed());
    if let Some(body) = failure {
        panic!("/healthz failed while publishing progressed: {body}");
    }
}

/// Over a 1 MB/s link, a claim of ten 900 kB payloads sends requests that
/// take longer than the publish timeout. Retrying the same claim fails the
/// same way forever; a claim that timed out must come back smaller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_timed_out_comes_back_smaller() {
    let (env, _pg, emulator) = TestEnv::isolated("timed_out_smaller").await;
    let link = devkit::Proxy::start(emulator.host()).await.expect("proxy");
    link.throttle(Some(1_000_000));
    let relay = env.spawn_relay_with(
        &[],
        &[
            ("PUBSUB_EMULATOR_HOST", link.addr()),
            ("PUBLISH_TIMEOUT", "2s".to_owned()),
        ],
    );
    relay.wait_ready(WAIT).await.expect("relay ready");
    let rows: Vec<NewRow> = (0..10).map(|i| large(i, 900_000)).collect();
    let ids = insert(&env.pool, &rows).await;
    let received = env
        .collector
        .wait_distinct(ids.len(), Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    assert_per_key_order(&received);
}

/// Two claims of one key in flight (pipeline depth 2) over a link so slow
/// that each publish request takes about 15 s (the publish timeout is 16 s).
/// The second claim's request can only start once the first one's is
/// answered, so it is answered about 30 s after it was claimed. A claim may
/// wait on Pub/Sub only as long as the server lets its transaction sit idle
/// (`idle_in_transaction_session_timeout`, 26 s here): the relay must give
/// the claim up before that, not have its commit fail on a connection the
/// server has already closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_never_waits_longer_than_the_server_lets_it() {
    let (env, _pg, emulator) = TestEnv::isolated("pipelined_late").await;
    let link = devkit::Proxy::start(emulator.host()).await.expect("proxy");
    let relay = env.spawn_relay_with(
        &["--batch-size", "10", "--pipeline-depth", "2"],
        &[
            ("PUBSUB_EMULATOR_HOST", link.addr()),
            ("PUBLISH_TIMEOUT", "16s".to_owned()),
        ],
    );
    relay.wait_ready(WAIT).await.expect("relay ready");
    link.throttle(Some(10_000));
    let rows: Vec<NewRow> = (0..20).map(|i| large(i, 15_000)).collect();
    let ids = insert(&env.pool, &rows).await;
    devkit::wait_for("two claims in flight", WAIT, || async {
        let claims = relay.metric("outbox_batch_rows_count").await?;
        (claims >= 2.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", relay.log()));
    let claimed = Instant::now();
    // Past the second request's answer (about 30 s after the claims), the
    // link recovers, so the test ends soon.
    tokio::time::sleep_until((claimed + Duration::from_secs(32)).into()).await;
    link.throttle(None);
    let duplicates = env.expect_delivered(&ids).await;
    let failed_commits = relay.metric("outbox_database_errors_total").await;
    println!("{duplicates} duplicates, database errors {failed_commits:?}");
    assert_eq!(
        failed_commits,
        Some(0.0),
        "a claim's transaction was ended by the server while the relay still waited on it\n{}",
        relay.log()
    );
    assert!(
        duplicates <= 20,
        "{duplicates} duplicates, more than in flight"
    );
}
