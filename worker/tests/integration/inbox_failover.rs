//! Leader election of the inbox worker with the `postgres` backend, with real
//! processes: only the leader pulls, SIGTERM hands over at once, `kill -9`
//! fails over to the standby, and every message is stored exactly once.
//! The handover tests use unordered subscriptions because of an emulator
//! limitation (see [`leader_and_standby`]).
//!
//! A relay on the same database produces the messages; it elects its own
//! leader with the same backend, so these tests also show that a relay and
//! an inbox worker never contend for one lock (the inbox would never lead).

use std::time::{Duration, Instant};

use devkit::{WorkerProcess, wait_for};
use uuid::Uuid;

use crate::harness::*;
use crate::inbox_support::*;

/// Election flags for both inbox workers: the postgres backend explicitly
/// (no API server here), with fast timings.
fn elected_inbox(identity: &str) -> Vec<(&'static str, String)> {
    let mut env = fast_election();
    env.push(("LEADER_ELECTION", "postgres".to_owned()));
    env.push(("POD_NAME", identity.to_owned()));
    env
}

async fn inbox_leads(inbox: &WorkerProcess) -> bool {
    inbox.metric("inbox_is_leader").await == Some(1.0)
}

async fn received(inbox: &WorkerProcess) -> f64 {
    inbox
        .metric("inbox_messages_received_total")
        .await
        .unwrap_or(0.0)
}

/// Waits until exactly one of the two leads; returns (leader, standby) indexes.
async fn elected(inboxes: &[WorkerProcess; 2]) -> (usize, usize) {
    wait_for("one leader among two inbox workers", WAIT, || async {
        match (
            inbox_leads(&inboxes[0]).await,
            inbox_leads(&inboxes[1]).await,
        ) {
            (true, false) => Some((0, 1)),
            (false, true) => Some((1, 0)),
            _ => None,
        }
    })
    .await
    .expect("a leader")
}

/// Waits until every message is in the inbox, then checks that each is
/// there exactly once and nothing else is.
async fn expect_stored_once(ib: &InboxEnv, ids: &[Uuid]) {
    ib.wait_stored(ids.len() as i64).await;
    let (rows, distinct, matching): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_id), \
                count(*) FILTER (WHERE message_id = ANY($1::uuid[]::text[])) FROM inbox",
    )
    .bind(ids)
    .fetch_one(&ib.env.pool)
    .await
    .expect("count");
    assert_eq!(rows, ids.len() as i64, "one row per message");
    assert_eq!(distinct, rows, "no message stored twice");
    assert_eq!(matching, rows, "every row is one of the messages sent");
}

/// Rows of one ordering key stored (by id) after a later one of that key.
async fn order_breaks_in_inbox(ib: &InboxEnv) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM ( \
           SELECT seq, lag(seq) OVER (PARTITION BY ordering_key ORDER BY id) AS prev FROM ( \
             SELECT id, ordering_key, split_part(convert_from(payload, 'UTF8'), ':', 2)::bigint AS seq \
             FROM inbox) r) s \
         WHERE seq < prev",
    )
    .fetch_one(&ib.env.pool)
    .await
    .expect("order check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_standby_does_not_pull_while_the_leader_does() {
    let ib = InboxEnv::new("inbox_standby").await;
    let inboxes = [
        ib.spawn_inbox_with(&[], &elected_inbox("inbox-a")),
        ib.spawn_inbox_with(&[], &elected_inbox("inbox-b")),
    ];
    let (leader, standby) = elected(&inboxes).await;
    inboxes[standby]
        .wait_ready(WAIT)
        .await
        .expect("the standby is ready while idle");
    let ids = insert(&ib.env.pool, &numbered(0, 3_000, 10)).await;
    let _relay = ib.env.spawn_relay_with(&[], &fast_election());
    expect_stored_once(&ib, &ids).await;
    assert_eq!(
        received(&inboxes[standby]).await,
        0.0,
        "the standby pulled messages while the leader did"
    );
    assert_eq!(
        inboxes[leader]
            .metric("inbox_messages_stored_total")
            .await
            .unwrap_or(0.0),
        ids.len() as f64,
        "the leader stored everything"
    );
    assert!(inbox_leads(&inboxes[leader]).await && !inbox_leads(&inboxes[standby]).await);
    assert_eq!(order_breaks_in_inbox(&ib).await, 0, "per-key order");
}

/// The leader with one stream that may hold 100 messages, then the standby
/// with eight streams.
///
/// Why: the emulator does not notice that a subscriber's streams ended,
/// whether it was killed or closed them on SIGTERM (its log shows gRPC's
/// `closedInternal` failing with `NoSuchMethodError`), and keeps
/// dispatching to them. On an ordered subscription delivery then stalls for
/// good (seen also without leader election: SIGTERM one inbox worker,
/// start another); on an unordered one, what the dead streams swallow comes
/// back after the ack deadline (10 s) and is dealt out again, dead streams
/// included. So the failover tests use unordered subscriptions, and the
/// leader that goes away has one small stream beside the standby's eight:
/// few messages are swallowed per ack deadline, and few of those again.
/// Real Pub/Sub closes the streams with the connection.
async fn leader_and_standby(ib: &InboxEnv) -> [WorkerProcess; 2] {
    let leader = ib.spawn_inbox_with(
        &["--streams", "1", "--max-outstanding-messages", "100"],
        &elected_inbox("inbox-leader"),
    );
    wait_for("the first inbox worker to lead", WAIT, || async {
        inbox_leads(&leader).await.then_some(())
    })
    .await
    .expect("it leads");
    let standby = ib.spawn_inbox_with(&["--streams", "8"], &elected_inbox("inbox-standby"));
    standby
        .wait_ready(WAIT)
        .await
        .expect("the standby is ready");
    assert!(!inbox_leads(&standby).await, "two leaders");
    [leader, standby]
}

/// A leader and a standby, and 6,000 messages on their way, of which the
/// leader stored 1,000.
async fn handover_setup(ib: &InboxEnv) -> ([WorkerProcess; 2], Vec<Uuid>, WorkerProcess) {
    let inboxes = leader_and_standby(ib).await;
    let ids = insert(&ib.env.pool, &numbered(0, 6_000, 10)).await;
    let relay = ib.env.spawn_relay_with(&[], &fast_election());
    ib.wait_stored(1_000).await;
    (inboxes, ids, relay)
}

/// Waits until `inbox` leads, within `limit`; returns how long that took.
async fn leads_within(inbox: &WorkerProcess, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for("the standby to lead", limit, || async {
        inbox_leads(inbox).await.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", inbox.log()));
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_sigterm_of_the_leader_hands_over_at_once() {
    let ib = InboxEnv::with_ordering("inbox_failover_term", false).await;
    let ([mut leader, standby], ids, _relay) = handover_setup(&ib).await;
    let sent = Instant::now();
    let status = leader
        .terminate(Duration::from_secs(15))
        .await
        .expect("exits");
    let exited = sent.elapsed();
    assert!(status.success(), "{status:?}");
    let at_handover = ib.stored().await;
    assert!(
        at_handover < ids.len() as i64,
        "the leader stored everything before SIGTERM; the test proves nothing"
    );
    // Not waiting for the lock's expiry (4 s here): the leader released it.
    let handover = exited + leads_within(&standby, Duration::from_secs(3)).await;
    expect_stored_once(&ib, &ids).await;
    println!(
        "inbox SIGTERM: leader exited after {exited:?} with {at_handover} of {} stored; standby leading {handover:?} after SIGTERM; all stored after {:?}",
        ids.len(),
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_kill_9_of_the_leader_fails_over_to_the_standby() {
    let ib = InboxEnv::with_ordering("inbox_failover_kill", false).await;
    let ([mut leader, standby], ids, _relay) = handover_setup(&ib).await;
    leader.kill().expect("kill -9");
    let killed = Instant::now();
    let at_kill = ib.stored().await;
    assert!(
        at_kill < ids.len() as i64,
        "the leader stored everything before it was killed; the test proves nothing"
    );
    // The lock session dies with the process's socket: no expiry to wait for.
    let takeover = leads_within(&standby, Duration::from_secs(3)).await;
    expect_stored_once(&ib, &ids).await;
    let duplicates = standby
        .metric("inbox_duplicates_total")
        .await
        .unwrap_or(0.0);
    println!(
        "inbox kill -9 with {at_kill} of {} stored: standby leading after {takeover:?}, all stored after {:?}, {duplicates} redeliveries absorbed",
        ids.len(),
        killed.elapsed()
    );
}

/// The leader's lock session is ended under it (as when its database link
/// fails): it notices at its next confirmation, stops pulling, and the
/// standby, already waiting for the lock, takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_leader_that_loses_its_lock_stops_pulling_and_the_standby_takes_over() {
    let ib = InboxEnv::with_ordering("inbox_failover_lost", false).await;
    let ([leader, standby], ids, _relay) = handover_setup(&ib).await;
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'outbox-worker leader inbox-leader' \
           AND datname = current_database()",
    )
    .fetch_all(&ib.env.pool)
    .await
    .expect("terminate");
    assert_eq!(ended, vec![true], "one lock session of the leader");
    let cut = Instant::now();
    wait_for(
        "the leader to step down",
        Duration::from_secs(5),
        || async { (!inbox_leads(&leader).await).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", leader.log()));
    let stepped_down = cut.elapsed();
    // is_leader drops to 0 only once the term ended, its pulls closed.
    let pulled = received(&leader).await;
    let takeover = leads_within(&standby, Duration::from_secs(3)).await;
    expect_stored_once(&ib, &ids).await;
    assert_eq!(
        received(&leader).await,
        pulled,
        "the former leader pulled after it stepped down"
    );
    assert!(!inbox_leads(&leader).await, "two leaders");
    println!(
        "inbox lock lost: leader stepped down after {stepped_down:?}, standby leading {takeover:?} later, all stored after {:?}",
        cut.elapsed()
    );
}
