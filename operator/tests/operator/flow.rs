//! Status that tells the truth, through the reconcile shell and the API stand-in: the
//! figures a worker writes on its Lease arrive in status, `Stalled` is set with an Event
//! and clears by itself, and an `InboxRelay` is reconciled like an `OutboxRelay`.

use std::sync::Arc;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use outbox_operator::crd::InboxRelay;
use outbox_operator::reconcile::{RESYNC, RESYNC_NOT_READY, reconcile};
use outbox_operator::status::{READY, condition};
use serde_json::{Value, json};

use crate::common::example_text;
use crate::reconcile::{DEPLOYMENTS, EVENTS, Harness, LEASES, NS, cond, harness};

const INBOXES: &str = "/apis/outbox.dev/v1alpha1/namespaces/shop/inboxrelays";

fn ago(minutes: i64) -> String {
    (Timestamp::now() - SignedDuration::from_mins(minutes)).to_string()
}

fn rolled_out(h: &Harness, name: &str) {
    h.api.set_status(DEPLOYMENTS, name, json!({
        "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2
    }));
}

/// The Lease as a leading worker keeps it: renewed now, figures in its annotations.
fn worker_lease(h: &Harness, name: &str, acquired_minutes_ago: i64, figures: Value) {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "annotations": figures},
        "spec": {
            "holderIdentity": format!("{name}-5c9d8-x2x4q"), "leaseDurationSeconds": 15,
            "acquireTime": ago(acquired_minutes_ago), "renewTime": Timestamp::now().to_string(),
        },
    });
    if h.api.get(LEASES, name).is_some() {
        h.api.edit(LEASES, name, |l| *l = lease);
    } else {
        h.api.create(LEASES, lease);
    }
}

fn event_reasons(h: &Harness) -> Vec<(String, String)> {
    h.api
        .list(EVENTS)
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or_default().to_owned(),
                e["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn figures_from_the_workers_lease_arrive_in_status() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("first");
    rolled_out(&h, "orders");
    let progress = ago(0);
    worker_lease(
        &h,
        "orders",
        30,
        json!({
            "outbox.dev/report-time": progress,
            "outbox.dev/backlog": "2500",
            "outbox.dev/oldest-pending-age-seconds": "3.9",
            "outbox.dev/messages-total": "120000",
            "outbox.dev/dead-letters-total": "2",
            "outbox.dev/last-progress-time": progress,
            "outbox.dev/paused-keys": "0",
        }),
    );
    let action = h.reconcile("orders").await.expect("second");
    assert_eq!(action, Action::requeue(RESYNC));
    let relay = h.relay("orders");
    let status = relay.status.as_ref().expect("status");
    assert_eq!(status.backlog, Some(2500));
    assert_eq!(status.oldest_pending_age.as_deref(), Some("3s"));
    assert_eq!(status.messages_total, Some(120_000));
    assert_eq!(status.dead_letters, Some(2));
    assert_eq!(status.paused_keys, Some(0));
    assert_eq!(
        status.last_progress_time.as_deref(),
        Some(progress.as_str())
    );
    assert_eq!(cond(&relay, READY).1, "LeaderElected");
    // What `kubectl get outboxrelays` prints in BACKLOG and LAG.
    let stored = h
        .api
        .get(crate::reconcile::RELAYS, "orders")
        .expect("stored");
    assert_eq!(stored["status"]["backlog"], 2500);
    assert_eq!(stored["status"]["oldestPendingAge"], "3s");
}

#[tokio::test]
async fn stalled_is_set_with_an_event_and_clears_by_itself() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("first");
    rolled_out(&h, "orders");

    // Rows wait, and the leader (for an hour) last published 7 minutes ago.
    worker_lease(
        &h,
        "orders",
        60,
        json!({
            "outbox.dev/backlog": "800", "outbox.dev/last-progress-time": ago(7),
        }),
    );
    let action = h.reconcile("orders").await.expect("stalled");
    assert_eq!(action, Action::requeue(RESYNC_NOT_READY), "look again soon");
    let (status, reason, message) = cond(&h.relay("orders"), READY);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Stalled"));
    assert!(
        message.starts_with("800 rows wait and none was published for 7m"),
        "{message}"
    );
    let events = event_reasons(&h);
    assert!(
        events.iter().any(|(r, n)| r == "Stalled" && n == &message),
        "{events:?}"
    );

    // Reconciled again while still stalled: no second Event.
    h.reconcile("orders").await.expect("still stalled");
    let stalled_events = event_reasons(&h)
        .iter()
        .filter(|(r, _)| r == "Stalled")
        .count();
    assert_eq!(stalled_events, 1);

    // The worker publishes again: Ready by itself, with an Event.
    worker_lease(
        &h,
        "orders",
        60,
        json!({
            "outbox.dev/backlog": "120", "outbox.dev/last-progress-time": ago(0),
        }),
    );
    h.reconcile("orders").await.expect("recovered");
    let (status, reason, _) = cond(&h.relay("orders"), READY);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "LeaderElected")
    );
    assert!(
        event_reasons(&h).iter().any(|(r, _)| r == "Recovered"),
        "{:?}",
        event_reasons(&h)
    );
}

fn create_inbox(h: &Harness, example: &str) -> InboxRelay {
    let value: Value =
        serde_norway::from_str(&example_text(&format!("inbox/{example}"))).expect("yaml");
    serde_json::from_value(h.api.create(INBOXES, value)).expect("inbox relay")
}

fn inbox(h: &Harness, name: &str) -> InboxRelay {
    serde_json::from_value(h.api.get(INBOXES, name).expect("stored")).expect("inbox relay")
}

#[tokio::test]
async fn an_inbox_relay_is_reconciled_like_an_outbox_relay() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    // An OutboxRelay of the same name lives beside it.
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("outbox relay");
    create_inbox(&h, "minimal.yaml");
    reconcile(Arc::new(inbox(&h, "orders")), h.ctx.clone())
        .await
        .expect("inbox relay");

    for collection in crate::reconcile::OWNED {
        let obj = h
            .api
            .get(collection, "orders-inbox")
            .unwrap_or_else(|| panic!("{collection}/orders-inbox"));
        assert_eq!(obj["metadata"]["ownerReferences"][0]["kind"], "InboxRelay");
        // The relay's own objects are untouched and still its own.
        let relay_obj = h.api.get(collection, "orders").expect("relay's object");
        assert_eq!(
            relay_obj["metadata"]["ownerReferences"][0]["kind"],
            "OutboxRelay"
        );
    }
    let dep = h.deployment("orders-inbox");
    let container = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["args"],
        json!(["inbox", "--leader-election", "kubernetes"])
    );
    let status = inbox(&h, "orders").status.expect("status");
    assert_eq!(
        condition(&status, READY).map(|c| c.reason.as_str()),
        Some("NoReadyReplicas")
    );

    // Rolled out, led, and the figures of the inbox worker arrive.
    rolled_out(&h, "orders-inbox");
    worker_lease(
        &h,
        "orders-inbox",
        10,
        json!({
            "outbox.dev/backlog": "4", "outbox.dev/parked-rows": "1",
            "outbox.dev/messages-total": "77", "outbox.dev/last-progress-time": ago(0),
        }),
    );
    reconcile(Arc::new(inbox(&h, "orders")), h.ctx.clone())
        .await
        .expect("again");
    let status = inbox(&h, "orders").status.expect("status");
    assert_eq!(status.leader.as_deref(), Some("orders-inbox-5c9d8-x2x4q"));
    assert_eq!(
        (status.backlog, status.parked_rows, status.messages_total),
        (Some(4), Some(1), Some(77))
    );
    assert_eq!(status.replicas, Some(2));
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/instance=orders,app.kubernetes.io/name=outbox-inbox-worker")
    );
    assert_eq!(
        condition(&status, READY).map(|c| (c.status.as_str(), c.reason.as_str())),
        Some(("True", "LeaderElected"))
    );
    assert!(h.api.requests().iter().any(|r| r.contains(&format!(
        "/apis/outbox.dev/v1alpha1/namespaces/{NS}/inboxrelays/orders/status"
    ))));
}
