//! Ownership and privilege through the reconcile shell: a same-named object the relay does
//! not own is reported and left alone, `spec.image` needs the operator's allowlist, and the
//! workers' Lease (owned by the relay through the owner the operator hands them) goes with
//! the relay.

use std::sync::Arc;
use std::time::Duration;

use outbox_operator::metrics::Metrics;
use outbox_operator::reconcile::Context;
use outbox_operator::resources::{DEFAULT_WORKER_IMAGE, Settings};
use outbox_operator::status::READY;
use serde_json::{Value, json};

use crate::fake_api::FakeApi;
use crate::reconcile::{DEPLOYMENTS, EVENTS, Harness, LEASES, RELAYS, cond, harness};

const ROLES: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles";
const ACCOUNTS: &str = "/api/v1/namespaces/shop/serviceaccounts";

fn warnings(h: &Harness) -> Vec<String> {
    h.api
        .list(EVENTS)
        .iter()
        .filter(|e| e["type"] == "Warning")
        .map(|e| {
            format!(
                "{}: {}",
                e["reason"].as_str().unwrap_or_default(),
                e["note"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

#[tokio::test]
async fn a_name_conflict_is_refused_without_any_change_to_the_foreign_object() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    // Someone else's Role and ServiceAccount named like the relay.
    let role = h.api.create(
        ROLES,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "orders", "labels": {"team": "payments"}},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
        }),
    );
    let payments = h.api.create(
        DEPLOYMENTS,
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "payments"}, "spec": {"selector": {}, "template": {}},
        }),
    );
    let account = h.api.create(
        ACCOUNTS,
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "orders", "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": "payments",
                "uid": payments["metadata"]["uid"], "controller": true,
            }]},
        }),
    );
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("blocked, not an error");

    let (status, reason, message) = cond(&h.relay("orders"), READY);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NameConflict")
    );
    assert!(message.contains("ServiceAccount shop/orders"), "{message}");
    assert!(message.contains("Role shop/orders"), "{message}");
    assert!(
        message.contains("not owned by this OutboxRelay"),
        "{message}"
    );
    // Left exactly as they were (same resourceVersion: never written), nothing else made.
    assert_eq!(h.api.get(ROLES, "orders"), Some(role));
    assert_eq!(h.api.get(ACCOUNTS, "orders"), Some(account));
    assert!(h.api.get(DEPLOYMENTS, "orders").is_none());
    assert_eq!(
        h.api.list(DEPLOYMENTS).len(),
        1,
        "only the payments Deployment"
    );
    assert!(
        warnings(&h).iter().any(|w| w.starts_with("NameConflict: ")),
        "{:?}",
        warnings(&h)
    );
    // Deleting the relay leaves them too: they never named it as owner.
    h.api.delete(RELAYS, "orders");
    h.api.collect_garbage();
    assert!(h.api.get(ROLES, "orders").is_some());
    assert!(h.api.get(ACCOUNTS, "orders").is_some());
}

#[tokio::test]
async fn the_relay_proceeds_once_the_conflicting_object_is_gone() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.api.create(
        ROLES,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "orders"}, "rules": [],
        }),
    );
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("blocked");
    assert_eq!(cond(&h.relay("orders"), READY).1, "NameConflict");
    h.api.delete(ROLES, "orders");
    h.reconcile("orders").await.expect("applied");
    assert!(h.api.get(DEPLOYMENTS, "orders").is_some());
    assert_eq!(cond(&h.relay("orders"), READY).1, "NoReadyReplicas");
}

#[tokio::test]
async fn a_lease_owned_by_something_else_is_a_name_conflict() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    let lease = h.api.create(
        LEASES,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "orders", "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "Deployment", "name": "scheduler",
                "uid": "99999999-0000-0000-0000-000000000001",
            }]},
            "spec": {"holderIdentity": "scheduler-0"},
        }),
    );
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("blocked");
    let (_, reason, message) = cond(&h.relay("orders"), READY);
    assert_eq!(reason, "NameConflict");
    assert!(message.contains("Lease shop/orders"), "{message}");
    assert_eq!(h.api.get(LEASES, "orders"), Some(lease));
}

fn strict_harness() -> Harness {
    let api = FakeApi::new();
    let metrics = Arc::new(Metrics::new());
    let mut ctx = Context::new(
        api.client(),
        Settings {
            default_image: DEFAULT_WORKER_IMAGE.into(),
            image_allowlist: Vec::new(),
        },
        metrics.clone(),
        None,
    );
    ctx.retry.delay = Duration::from_millis(1);
    Harness {
        api,
        ctx: Arc::new(ctx),
        metrics,
    }
}

#[tokio::test]
async fn an_image_outside_the_allowlist_is_refused_with_a_clear_condition() {
    let h = strict_harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    let mut value: Value =
        serde_norway::from_str(&crate::common::example_text("minimal.yaml")).expect("yaml");
    value["spec"]["image"] = json!("docker.io/attacker/miner:latest");
    h.api.create(RELAYS, value);
    h.reconcile("orders").await.expect("blocked");
    let (status, reason, message) = cond(&h.relay("orders"), READY);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ImageNotAllowed")
    );
    assert!(
        message.contains("docker.io/attacker/miner:latest"),
        "{message}"
    );
    assert!(message.contains("--image-allowlist"), "{message}");
    assert!(
        h.api.get(DEPLOYMENTS, "orders").is_none(),
        "no pod may run it"
    );

    // Naming the operator's own image is always allowed.
    h.api.edit(RELAYS, "orders", |r| {
        r["spec"]["image"] = json!(DEFAULT_WORKER_IMAGE)
    });
    h.reconcile("orders").await.expect("applied");
    assert!(h.api.get(DEPLOYMENTS, "orders").is_some());
}

#[test]
fn the_allowlist_matches_prefixes() {
    let settings = Settings {
        default_image: "ghcr.io/outbox-dev/outbox-worker:1.0.0".into(),
        image_allowlist: vec!["registry.example.com/outbox/".into()],
    };
    assert!(settings.image(None).is_ok());
    assert!(
        settings
            .image(Some("ghcr.io/outbox-dev/outbox-worker:1.0.0"))
            .is_ok()
    );
    assert!(
        settings
            .image(Some("registry.example.com/outbox/worker:2"))
            .is_ok()
    );
    for refused in [
        "ghcr.io/outbox-dev/outbox-worker:6.6.6",
        "registry.example.com/other/worker:2",
        "registry.example.com.evil.io/outbox/worker:2",
    ] {
        let err = settings
            .image(Some(refused))
            .expect_err(refused)
            .to_string();
        assert!(
            err.contains(refused) && err.contains("registry.example.com/outbox/"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn the_workers_lease_goes_with_the_relay() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("reconcile");
    // The Lease as the worker creates it, with the owner the operator gives it in its env.
    let dep = h.deployment("orders");
    let env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .clone();
    let var = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{name}"))
            .to_owned()
    };
    h.api.create(
        LEASES,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": var("LEASE_NAME"), "ownerReferences": [{
                "apiVersion": var("LEASE_OWNER_API_VERSION"), "kind": var("LEASE_OWNER_KIND"),
                "name": var("LEASE_OWNER_NAME"), "uid": var("LEASE_OWNER_UID"),
            }]},
            "spec": {"holderIdentity": "orders-1"},
        }),
    );
    // Our own Lease is no conflict.
    h.reconcile("orders").await.expect("again");
    assert_ne!(cond(&h.relay("orders"), READY).1, "NameConflict");

    h.api.delete(RELAYS, "orders");
    h.api.collect_garbage();
    assert!(
        h.api.get(LEASES, "orders").is_none(),
        "the Lease went with the relay"
    );
}
