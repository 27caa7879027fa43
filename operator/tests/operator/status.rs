//! (Deployment, Lease) → status.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use outbox_operator::crd::WorkerStatus;
use outbox_operator::status::{Blocker, DEGRADED, PROGRESSING, READY, compute, condition};
use serde_json::json;

use crate::common::example;

fn now() -> Timestamp {
    "2026-03-01T12:00:00Z".parse().expect("time")
}

fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "orders", "namespace": "shop", "generation": generation},
        "spec": {"selector": {}, "template": {}},
        "status": status,
    }))
    .expect("deployment")
}

fn lease(holder: &str, renewed: &str) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed},
    }))
    .expect("lease")
}

fn cond(s: &WorkerStatus, t: &str) -> (String, String) {
    let c = condition(s, t).unwrap_or_else(|| panic!("{t} missing"));
    (c.status.clone(), c.reason.clone())
}

fn pair(status: &str, reason: &str) -> (String, String) {
    (status.into(), reason.into())
}

#[test]
fn ready_when_rolled_out_and_led() {
    let relay = example("minimal.yaml");
    let dep = deployment(
        1,
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
    );
    let l = lease("orders-7d9f-abcde", "2026-03-01T11:59:55.000000Z");
    let s = compute(&relay, Some(&dep), Some(&l), None, now());
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.replicas, Some(2));
    assert_eq!(s.ready_replicas, Some(2));
    assert_eq!(s.leader.as_deref(), Some("orders-7d9f-abcde"));
    assert_eq!(cond(&s, READY), pair("True", "LeaderElected"));
    assert_eq!(cond(&s, PROGRESSING), pair("False", "RolloutComplete"));
    assert_eq!(cond(&s, DEGRADED), pair("False", "AsExpected"));
    let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, [READY, PROGRESSING, DEGRADED]);
}

#[test]
fn expired_lease_means_no_leader() {
    let relay = example("minimal.yaml");
    let dep = deployment(
        1,
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
    );
    let l = lease("orders-old", "2026-03-01T11:58:00.000000Z");
    let s = compute(&relay, Some(&dep), Some(&l), None, now());
    assert_eq!(s.leader, None);
    assert_eq!(cond(&s, READY), pair("False", "NoLeader"));
    let s = compute(&relay, Some(&dep), None, None, now());
    assert_eq!(cond(&s, READY), pair("False", "NoLeader"));
}

#[test]
fn rolling_out() {
    let relay = example("minimal.yaml");
    let dep = deployment(
        2,
        json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2}),
    );
    let s = compute(
        &relay,
        Some(&dep),
        Some(&lease("p", "2026-03-01T11:59:59.000000Z")),
        None,
        now(),
    );
    assert_eq!(cond(&s, PROGRESSING), pair("True", "RollingOut"));
    assert_eq!(cond(&s, READY), pair("True", "LeaderElected"));
    assert_eq!(s.replicas, Some(3));
}

#[test]
fn no_ready_replicas_and_deadline() {
    let relay = example("minimal.yaml");
    let dep = deployment(
        1,
        json!({
            "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
            "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet has timed out progressing."}]
        }),
    );
    let s = compute(&relay, Some(&dep), None, None, now());
    assert_eq!(s.ready_replicas, Some(0));
    assert_eq!(cond(&s, READY), pair("False", "NoReadyReplicas"));
    assert_eq!(
        cond(&s, PROGRESSING),
        pair("False", "ProgressDeadlineExceeded")
    );
    assert_eq!(cond(&s, DEGRADED), pair("True", "ProgressDeadlineExceeded"));
}

#[test]
fn blockers() {
    let relay = example("minimal.yaml");
    for (blocker, reason) in [
        (
            Blocker::SecretNotFound(
                "spec.database.urlSecretRef: Secret shop/orders-db not found".into(),
            ),
            "SecretNotFound",
        ),
        (
            Blocker::SecretKeyNotFound("no key".into()),
            "SecretKeyNotFound",
        ),
        (
            Blocker::InvalidSpec("invalid OutboxRelay: spec.pubsub.topic: ...".into()),
            "InvalidSpec",
        ),
    ] {
        let s = compute(&relay, None, None, Some(&blocker), now());
        assert_eq!(cond(&s, READY), pair("False", reason));
        assert_eq!(cond(&s, DEGRADED), pair("True", reason));
        assert_eq!(
            condition(&s, READY).map(|c| c.message.as_str()),
            Some(blocker.message())
        );
        assert_eq!(s.replicas, None);
    }
}

#[test]
fn transition_time_is_kept_while_status_is_unchanged() {
    let mut relay = example("minimal.yaml");
    let dep = deployment(
        1,
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
    );
    let l = lease("p", "2026-03-01T11:59:59.000000Z");
    let first = compute(&relay, Some(&dep), Some(&l), None, now());
    relay.status = Some(first.clone());
    let later: Timestamp = "2026-03-01T12:00:05Z".parse().expect("time");
    let l2 = lease("p", "2026-03-01T12:00:04.000000Z");
    let second = compute(&relay, Some(&dep), Some(&l2), None, later);
    assert_eq!(
        first, second,
        "an unchanged relay produces an identical status (no write)"
    );
    relay.status = Some(second);
    let third = compute(
        &relay,
        None,
        None,
        Some(&Blocker::SecretNotFound("gone".into())),
        later,
    );
    let ready = condition(&third, READY).expect("ready");
    assert_eq!(ready.last_transition_time, "2026-03-01T12:00:05Z");
}

#[test]
fn scaled_to_zero() {
    let mut relay = example("minimal.yaml");
    relay.spec.replicas = 0;
    let dep = deployment(1, json!({"observedGeneration": 1}));
    let s = compute(&relay, Some(&dep), None, None, now());
    assert_eq!(cond(&s, READY), pair("False", "ScaledToZero"));
    assert_eq!(cond(&s, PROGRESSING), pair("False", "RolloutComplete"));
}

fn reporting_lease(acquired: &str, annotations: serde_json::Value) -> Lease {
    serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "orders", "namespace": "shop", "annotations": annotations},
        "spec": {
            "holderIdentity": "orders-7d9f-abcde", "leaseDurationSeconds": 15,
            "acquireTime": acquired, "renewTime": "2026-03-01T11:59:58.000000Z",
        },
    }))
    .expect("lease")
}

fn rolled_out() -> Deployment {
    deployment(
        1,
        json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2}),
    )
}

#[test]
fn figures_on_the_lease_become_status_fields() {
    let l = reporting_lease(
        "2026-03-01T11:00:00Z",
        json!({
            "outbox.dev/report-time": "2026-03-01T11:59:58Z",
            "outbox.dev/backlog": "1200",
            "outbox.dev/oldest-pending-age-seconds": "75.2",
            "outbox.dev/messages-total": "987654",
            "outbox.dev/dead-letters-total": "3",
            "outbox.dev/last-progress-time": "2026-03-01T11:59:57.5Z",
            "outbox.dev/paused-keys": "1",
        }),
    );
    let s = compute(
        &example("minimal.yaml"),
        Some(&rolled_out()),
        Some(&l),
        None,
        now(),
    );
    assert_eq!(s.backlog, Some(1200));
    assert_eq!(s.oldest_pending_age.as_deref(), Some("1m15s"));
    assert_eq!(s.messages_total, Some(987_654));
    assert_eq!(s.dead_letters, Some(3));
    assert_eq!(s.paused_keys, Some(1));
    assert_eq!(s.parked_rows, None);
    assert_eq!(
        s.last_progress_time.as_deref(),
        Some("2026-03-01T11:59:57.5Z")
    );
    assert_eq!(s.report_time.as_deref(), Some("2026-03-01T11:59:58Z"));
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=orders,app.kubernetes.io/name=outbox-worker")
    );
    // Flowing: a backlog with recent progress is Ready.
    assert_eq!(cond(&s, READY), pair("True", "LeaderElected"));
}

#[test]
fn figures_of_an_expired_lease_are_not_shown() {
    let mut l = reporting_lease(
        "2026-03-01T11:00:00Z",
        json!({"outbox.dev/backlog": "5", "outbox.dev/last-progress-time": "2026-03-01T11:00:00Z"}),
    );
    if let Some(spec) = l.spec.as_mut() {
        spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            "2026-03-01T11:50:00Z".parse().expect("time"),
        ));
    }
    let s = compute(
        &example("minimal.yaml"),
        Some(&rolled_out()),
        Some(&l),
        None,
        now(),
    );
    assert_eq!(s.backlog, None);
    assert_eq!(cond(&s, READY), pair("False", "NoLeader"));
}

#[test]
fn rows_waiting_without_progress_for_stalled_after_is_stalled() {
    // Default stalledAfter is 5m: last publish 6 minutes ago, leader since an hour.
    let l = reporting_lease(
        "2026-03-01T11:00:00Z",
        json!({"outbox.dev/backlog": "40", "outbox.dev/last-progress-time": "2026-03-01T11:54:00Z"}),
    );
    let s = compute(
        &example("minimal.yaml"),
        Some(&rolled_out()),
        Some(&l),
        None,
        now(),
    );
    let c = condition(&s, READY).expect("ready");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Stalled"));
    assert_eq!(
        c.message,
        "40 rows wait and none was published for 6m0s (stalledAfter 5m0s)"
    );
    // Still the leader, and the pods are fine: only Ready says it.
    assert_eq!(s.leader.as_deref(), Some("orders-7d9f-abcde"));
    assert_eq!(cond(&s, DEGRADED), pair("False", "AsExpected"));
}

#[test]
fn no_stall_without_a_backlog_or_within_the_grace_of_a_new_term() {
    let relay = example("minimal.yaml");
    let dep = rolled_out();
    // Nothing waits: quiet is fine.
    let idle = reporting_lease(
        "2026-03-01T11:00:00Z",
        json!({"outbox.dev/backlog": "0", "outbox.dev/last-progress-time": "2026-03-01T10:00:00Z"}),
    );
    // A leader that took over a minute ago and has not published yet.
    let fresh = reporting_lease("2026-03-01T11:59:00Z", json!({"outbox.dev/backlog": "70"}));
    // A worker that reports no figures at all (an older worker): no judgement.
    let silent = reporting_lease("2026-03-01T10:00:00Z", json!({}));
    for l in [idle, fresh, silent] {
        let s = compute(&relay, Some(&dep), Some(&l), None, now());
        assert_eq!(cond(&s, READY), pair("True", "LeaderElected"), "{l:?}");
    }
    // The same fresh leader, 6 minutes into its term without publishing: stalled.
    let late = reporting_lease("2026-03-01T11:54:00Z", json!({"outbox.dev/backlog": "70"}));
    let s = compute(&relay, Some(&dep), Some(&late), None, now());
    assert_eq!(cond(&s, READY), pair("False", "Stalled"));
}

#[test]
fn stalled_after_is_configurable() {
    let mut relay = example("minimal.yaml");
    relay.spec.stalled_after = "10m".into();
    let l = reporting_lease(
        "2026-03-01T11:00:00Z",
        json!({"outbox.dev/backlog": "40", "outbox.dev/last-progress-time": "2026-03-01T11:54:00Z"}),
    );
    let s = compute(&relay, Some(&rolled_out()), Some(&l), None, now());
    assert_eq!(cond(&s, READY), pair("True", "LeaderElected"));
    relay.spec.stalled_after = "1m".into();
    let s = compute(&relay, Some(&rolled_out()), Some(&l), None, now());
    assert_eq!(cond(&s, READY), pair("False", "Stalled"));
}

#[test]
fn an_inbox_stalls_when_its_rows_wait_unprocessed() {
    let relay = crate::common::inbox_example("minimal.yaml");
    let l = reporting_lease(
        "2026-03-01T11:00:00Z",
        json!({"outbox.dev/backlog": "9", "outbox.dev/parked-rows": "2",
               "outbox.dev/last-progress-time": "2026-03-01T11:40:00Z"}),
    );
    let s = compute(&relay, Some(&rolled_out()), Some(&l), None, now());
    let c = condition(&s, READY).expect("ready");
    assert_eq!(c.reason, "Stalled");
    assert!(
        c.message.contains("none was processed for 20m0s"),
        "{}",
        c.message
    );
    assert_eq!(s.parked_rows, Some(2));
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=orders,app.kubernetes.io/name=outbox-inbox-worker")
    );
}

#[test]
fn an_inbox_without_election_is_ready_with_every_replica_consuming() {
    let relay = crate::common::inbox_example("unordered.yaml");
    let s = compute(&relay, Some(&rolled_out()), None, None, now());
    assert_eq!(cond(&s, READY), pair("True", "AllConsuming"));
    assert_eq!(s.leader, None);
}
