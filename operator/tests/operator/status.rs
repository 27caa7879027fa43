//! (Deployment, Lease) → status.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use outbox_operator::crd::OutboxRelayStatus;
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

fn cond(s: &OutboxRelayStatus, t: &str) -> (String, String) {
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
