//! The reconcile shell against the in-memory API-server stand-in (`fake_api`).

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use outbox_operator::crd::OutboxRelay;
use outbox_operator::metrics::Metrics;
use outbox_operator::reconcile::{
    Context, Error, RESYNC, RESYNC_NOT_READY, backoff, error_policy, reconcile,
};
use outbox_operator::resources::SECRET_HASH_ANNOTATION;
use outbox_operator::status::{DEGRADED, READY, condition};
use serde_json::{Value, json};

use crate::common::{example_text, settings};
use crate::fake_api::FakeApi;

pub(crate) const NS: &str = "shop";
pub(crate) const RELAYS: &str = "/apis/outbox.dev/v1alpha1/namespaces/shop/outboxrelays";
pub(crate) const SECRETS: &str = "/api/v1/namespaces/shop/secrets";
pub(crate) const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/shop/deployments";
pub(crate) const PDBS: &str = "/apis/policy/v1/namespaces/shop/poddisruptionbudgets";
pub(crate) const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/shop/leases";
pub(crate) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
pub(crate) const OWNED: &[&str] = &[
    "/api/v1/namespaces/shop/serviceaccounts",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/rolebindings",
    DEPLOYMENTS,
    PDBS,
];

pub(crate) struct Harness {
    pub(crate) api: FakeApi,
    pub(crate) ctx: Arc<Context>,
    pub(crate) metrics: Arc<Metrics>,
}

pub(crate) fn harness() -> Harness {
    let api = FakeApi::new();
    let metrics = Arc::new(Metrics::new());
    let mut ctx = Context::new(
        api.client(),
        settings(),
        metrics.clone(),
        Some("operator-0".into()),
    );
    ctx.retry.delay = Duration::from_millis(1);
    Harness {
        api,
        ctx: Arc::new(ctx),
        metrics,
    }
}

impl Harness {
    pub(crate) fn create_relay(&self, example: &str) -> OutboxRelay {
        let value: Value = serde_norway::from_str(&example_text(example)).expect("yaml");
        let stored = self.api.create(RELAYS, value);
        serde_json::from_value(stored).expect("relay")
    }

    pub(crate) fn relay(&self, name: &str) -> OutboxRelay {
        serde_json::from_value(self.api.get(RELAYS, name).expect("relay stored")).expect("relay")
    }

    pub(crate) fn create_secret(&self, name: &str, key: &str, value: &str) {
        use std::io::Write;
        let mut b64 = Vec::new();
        // base64 without a dependency: let k8s-openapi's ByteString do it.
        let bytes = k8s_openapi::ByteString(value.as_bytes().to_vec());
        write!(
            b64,
            "{}",
            serde_json::to_value(&bytes)
                .expect("b64")
                .as_str()
                .expect("str")
        )
        .expect("write");
        self.api.create(
            SECRETS,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name},
                "data": {key: String::from_utf8(b64).expect("utf8")},
            }),
        );
    }

    pub(crate) async fn reconcile(&self, name: &str) -> Result<Action, Error> {
        reconcile(Arc::new(self.relay(name)), self.ctx.clone()).await
    }

    pub(crate) fn deployment(&self, name: &str) -> Value {
        self.api.get(DEPLOYMENTS, name).expect("deployment")
    }
}

pub(crate) fn cond(relay: &OutboxRelay, t: &str) -> (String, String, String) {
    let status = relay.status.as_ref().expect("status");
    let c = condition(status, t).unwrap_or_else(|| panic!("{t} missing"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn create_applies_everything_with_owner_references() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://u:p@db/orders");
    let relay = h.create_relay("minimal.yaml");
    let uid = relay.metadata.uid.clone().expect("uid");

    let action = h.reconcile("orders").await.expect("reconcile");
    assert_eq!(action, Action::requeue(RESYNC_NOT_READY));

    for collection in OWNED {
        let obj = h
            .api
            .get(collection, "orders")
            .unwrap_or_else(|| panic!("{collection}/orders missing"));
        let owners = obj["metadata"]["ownerReferences"]
            .as_array()
            .expect("owners");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0]["uid"], json!(uid), "{collection}");
        assert_eq!(owners[0]["controller"], true, "{collection}");
        assert_eq!(owners[0]["kind"], "OutboxRelay");
        assert_eq!(
            obj["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "outbox-operator"
        );
    }
    // Every owned object, whatever its kind, has a controller owner (what GC needs).
    for (collection, obj) in h.api.all() {
        if collection == RELAYS || collection == SECRETS || collection == EVENTS {
            continue;
        }
        assert!(
            obj["metadata"]["ownerReferences"][0]["controller"] == true,
            "{collection}: {obj}"
        );
    }
    // All writes were server-side applies with the operator's field manager.
    let requests = h.api.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("PATCH /apis/apps/v1/namespaces/shop/deployments/orders"))
    );

    let dep = h.deployment("orders");
    assert_eq!(dep["spec"]["replicas"], 2);
    let hash = dep["spec"]["template"]["metadata"]["annotations"][SECRET_HASH_ANNOTATION]
        .as_str()
        .expect("hash");
    assert_eq!(hash.len(), 32);

    // Status went through the status subresource.
    let relay = h.relay("orders");
    let status = relay.status.as_ref().expect("status written");
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.ready_replicas, Some(0));
    assert_eq!(cond(&relay, READY).1, "NoReadyReplicas");
    assert!(
        requests
            .iter()
            .any(|r| r
                == "PATCH /apis/outbox.dev/v1alpha1/namespaces/shop/outboxrelays/orders/status")
    );
}

#[tokio::test]
async fn status_follows_deployment_and_lease() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("first");

    h.api.set_status(DEPLOYMENTS, "orders", json!({
        "observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2
    }));
    let renew = k8s_openapi::jiff::Timestamp::now().to_string();
    h.api.create(LEASES, json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "orders"},
        "spec": {"holderIdentity": "orders-5c9d8-x2x4q", "leaseDurationSeconds": 15, "renewTime": renew},
    }));
    let action = h.reconcile("orders").await.expect("second");
    assert_eq!(action, Action::requeue(RESYNC));
    let relay = h.relay("orders");
    let status = relay.status.as_ref().expect("status");
    assert_eq!(status.leader.as_deref(), Some("orders-5c9d8-x2x4q"));
    assert_eq!(status.ready_replicas, Some(2));
    assert_eq!(cond(&relay, READY).0, "True");
}

#[tokio::test]
async fn spec_change_updates_the_deployment() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("first");
    let before = h.deployment("orders");
    assert!(h.api.get(PDBS, "orders").is_some());

    // kubectl edit: replicas 2 → 1, new image, batch size.
    let edited = h.api.edit(RELAYS, "orders", |r| {
        r["spec"]["replicas"] = json!(1);
        r["spec"]["image"] = json!("ghcr.io/outbox-dev/outbox-worker:9.9.9");
        r["spec"]["batchSize"] = json!(250);
    });
    assert_eq!(edited["metadata"]["generation"], 2);

    h.reconcile("orders").await.expect("second");
    let after = h.deployment("orders");
    assert_eq!(after["spec"]["replicas"], 1);
    assert_eq!(
        after["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/outbox-dev/outbox-worker:9.9.9"
    );
    let env = after["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .clone();
    assert!(env.contains(&json!({"name": "BATCH_SIZE", "value": "250"})));
    assert_ne!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert_eq!(
        after["metadata"]["generation"], 2,
        "the stand-in bumps generation on spec changes"
    );
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "updated in place, not recreated"
    );
    // One replica: the PDB is gone.
    assert!(h.api.get(PDBS, "orders").is_none());
}

#[tokio::test]
async fn missing_secret_sets_condition_and_event_without_error() {
    let h = harness();
    h.create_relay("minimal.yaml");
    let action = h
        .reconcile("orders")
        .await
        .expect("a missing secret is not an error");
    assert_eq!(action, Action::requeue(RESYNC_NOT_READY));
    let relay = h.relay("orders");
    let (status, reason, message) = cond(&relay, READY);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert!(
        message.contains("spec.database.urlSecretRef") && message.contains("orders-db"),
        "{message}"
    );
    assert_eq!(cond(&relay, DEGRADED).0, "True");
    assert!(
        h.api.get(DEPLOYMENTS, "orders").is_none(),
        "nothing applied without the secret"
    );
    let events = h.api.list(EVENTS);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "SecretNotFound");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["regarding"]["name"], "orders");
    assert_eq!(
        h.metrics
            .reconciliations
            .get_or_create(&outbox_operator::metrics::OutcomeLabels {
                outcome: "blocked".into()
            })
            .get(),
        1
    );

    // The secret appears: the next reconcile recovers.
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.reconcile("orders").await.expect("recovered");
    assert!(h.api.get(DEPLOYMENTS, "orders").is_some());
    assert_ne!(cond(&h.relay("orders"), READY).1, "SecretNotFound");
}

#[tokio::test]
async fn missing_secret_key() {
    let h = harness();
    h.create_secret("orders-db", "password", "x");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("not an error");
    assert_eq!(cond(&h.relay("orders"), READY).1, "SecretKeyNotFound");
}

#[tokio::test]
async fn invalid_spec_that_bypassed_the_schema() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    let mut value: Value = serde_norway::from_str(&example_text("minimal.yaml")).expect("yaml");
    value["spec"]["pubsub"]["topic"] = json!("projects/acme-shop-prod/topics/goog-orders");
    h.api.create(RELAYS, value);
    let action = h.reconcile("orders").await.expect("not an error");
    assert_eq!(action, Action::await_change());
    let (status, reason, message) = cond(&h.relay("orders"), READY);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("spec.pubsub.topic"), "{message}");
    assert!(h.api.get(DEPLOYMENTS, "orders").is_none());
}

#[tokio::test]
async fn conflict_on_apply_is_retried() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.api.inject_conflicts("deployments", 2);
    h.api.inject_conflicts("outboxrelays", 1);
    h.reconcile("orders").await.expect("conflicts are retried");
    assert_eq!(h.api.pending_conflicts("deployments"), 0);
    assert_eq!(h.api.pending_conflicts("outboxrelays"), 0);
    assert_eq!(
        h.deployment("orders")["spec"]["replicas"],
        2,
        "the write was not lost"
    );
    assert!(
        h.relay("orders").status.is_some(),
        "the status write was not lost"
    );
    let patches = h
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH /apis/apps/v1/namespaces/shop/deployments/orders"))
        .count();
    assert_eq!(patches, 3);
}

#[tokio::test]
async fn persistent_conflict_errors_and_backs_off() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.api.inject_conflicts("deployments", 100);
    let relay = Arc::new(h.relay("orders"));
    let err = reconcile(relay.clone(), h.ctx.clone())
        .await
        .expect_err("gives up");
    assert_eq!(err.metric_label(), "conflict");
    assert_eq!(
        error_policy(relay.clone(), &err, h.ctx.clone()),
        Action::requeue(backoff(1))
    );
    assert_eq!(
        error_policy(relay.clone(), &err, h.ctx.clone()),
        Action::requeue(backoff(2))
    );
    assert!(backoff(2) > backoff(1));
    assert_eq!(backoff(50), Duration::from_secs(300));
    let metrics = h.metrics.encode().expect("metrics");
    assert!(
        metrics.contains("outbox_operator_reconcile_errors_total{error=\"conflict\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn stale_resource_version_is_a_conflict() {
    // The stand-in enforces optimistic concurrency like the API server.
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, PostParams};
    let h = harness();
    let api: Api<ConfigMap> = Api::namespaced(h.api.client(), NS);
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("c".into());
    let created = api
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let mut first = created.clone();
    first.data = Some([("a".to_string(), "1".to_string())].into());
    api.replace("c", &PostParams::default(), &first)
        .await
        .expect("fresh write");
    let err = api
        .replace("c", &PostParams::default(), &created)
        .await
        .expect_err("stale write");
    assert!(matches!(err, kube::Error::Api(s) if s.is_conflict()));
}

#[tokio::test]
async fn rotated_secret_rolls_the_pods() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("first");
    let hash = |h: &Harness| {
        h.deployment("orders")["spec"]["template"]["metadata"]["annotations"]
            [SECRET_HASH_ANNOTATION]
            .clone()
    };
    let before = hash(&h);
    h.reconcile("orders").await.expect("unchanged");
    assert_eq!(hash(&h), before);
    h.api.delete(SECRETS, "orders-db");
    h.create_secret("orders-db", "url", "postgres://db/orders?password=rotated");
    h.reconcile("orders").await.expect("rotated");
    assert_ne!(hash(&h), before);
    assert!(
        h.api
            .list(EVENTS)
            .iter()
            .any(|e| e["reason"] == "SecretRotated")
    );
}

#[tokio::test]
async fn deleting_the_relay_collects_everything_it_owned() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("reconcile");
    h.api.delete(RELAYS, "orders");
    let deleted = h.api.collect_garbage();
    assert_eq!(deleted.len(), OWNED.len(), "{deleted:?}");
    for collection in OWNED {
        assert!(h.api.get(collection, "orders").is_none(), "{collection}");
    }
    assert!(
        h.api.get(SECRETS, "orders-db").is_some(),
        "the Secret is not owned"
    );
}

#[tokio::test]
async fn full_example_with_credentials() {
    let h = harness();
    let ns_fix = |v: &str| v.replace("namespace: billing", "namespace: shop");
    let value: Value = serde_norway::from_str(&ns_fix(&example_text("full.yaml"))).expect("yaml");
    h.create_secret("billing-db", "DATABASE_URL", "postgres://db/billing");
    let stored = h.api.create(RELAYS, value);
    // Credentials secret missing → blocked, naming the field.
    h.reconcile("billing-events").await.expect("blocked");
    let (_, reason, message) = cond(&h.relay("billing-events"), READY);
    assert_eq!(reason, "SecretNotFound");
    assert!(
        message.contains("spec.pubsub.credentialsSecretRef"),
        "{message}"
    );
    h.create_secret("billing-pubsub-sa", "key.json", "{}");
    // So is the OTLP headers secret of spec.tracing.
    h.reconcile("billing-events").await.expect("blocked");
    let (_, reason, message) = cond(&h.relay("billing-events"), READY);
    assert_eq!(reason, "SecretNotFound");
    assert!(
        message.contains("spec.tracing.headersSecretRef") && message.contains("billing-otlp"),
        "{message}"
    );
    h.create_secret("billing-otlp", "headers", "authorization=Bearer%20t0k3n");
    h.reconcile("billing-events").await.expect("applied");
    let dep = h.deployment("billing-events");
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(
        dep["metadata"]["ownerReferences"][0]["uid"],
        stored["metadata"]["uid"]
    );
}

#[tokio::test]
async fn relay_being_deleted_is_left_to_the_garbage_collector() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    let mut relay = h.relay("orders");
    relay.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    let action = reconcile(Arc::new(relay), h.ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert!(h.api.get(DEPLOYMENTS, "orders").is_none());
}

#[tokio::test]
async fn foreign_pdb_is_not_deleted() {
    let h = harness();
    h.create_secret("dev-postgres", "url", "postgres://db/dev");
    let mut value: Value = serde_norway::from_str(&example_text("dev.yaml")).expect("yaml");
    value["metadata"]["namespace"] = json!(NS);
    h.api.create(RELAYS, value);
    h.api.create(
        PDBS,
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": "dev-relay"},
            "spec": {"maxUnavailable": 1},
        }),
    );
    h.reconcile("dev-relay").await.expect("reconcile");
    assert!(
        h.api.get(PDBS, "dev-relay").is_some(),
        "a PDB the relay does not own stays"
    );
}

#[tokio::test]
async fn the_controller_reconciles_listed_relays() {
    // The real kube Controller (`reconcile::run`) on the stand-in: initial lists only.
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    let controller = tokio::spawn(outbox_operator::reconcile::run(
        h.ctx.clone(),
        Some(NS.into()),
    ));
    let mut applied = false;
    for _ in 0..200 {
        if h.api
            .get(RELAYS, "orders")
            .is_some_and(|r| r["status"]["conditions"].is_array())
        {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    controller.abort();
    assert!(applied, "requests: {:#?}", h.api.requests());
    assert!(h.api.get(DEPLOYMENTS, "orders").is_some());
    let watches: Vec<String> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("WATCH"))
        .collect();
    for collection in OWNED.iter().chain([&RELAYS]) {
        assert!(
            watches.iter().any(|w| w.ends_with(collection)),
            "{collection} not watched: {watches:?}"
        );
    }
}

#[tokio::test]
async fn objects_refused_as_invalid_become_an_invalid_spec_condition() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.api.inject_errors(
        "deployments",
        1,
        http::StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
    );
    let action = h.reconcile("orders").await.expect("not an error");
    assert_eq!(action, Action::await_change());
    let (status, reason, message) = cond(&h.relay("orders"), READY);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("refused"), "{message}");
}

fn minimal_with_tracing(tracing: Value) -> Value {
    let mut value: Value = serde_norway::from_str(&example_text("minimal.yaml")).expect("yaml");
    value["spec"]["tracing"] = tracing;
    value
}

fn secret_hash(h: &Harness, name: &str) -> Value {
    h.deployment(name)["spec"]["template"]["metadata"]["annotations"][SECRET_HASH_ANNOTATION]
        .clone()
}

#[tokio::test]
async fn rotated_otlp_headers_secret_rolls_the_pods() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_secret("otlp", "headers", "authorization=Bearer%20one");
    h.api.create(
        RELAYS,
        minimal_with_tracing(json!({
            "endpoint": "http://collector:4317",
            "headersSecretRef": {"name": "otlp", "key": "headers"},
        })),
    );
    h.reconcile("orders").await.expect("first");
    let before = secret_hash(&h, "orders");
    h.api.delete(SECRETS, "otlp");
    h.create_secret("otlp", "headers", "authorization=Bearer%20two");
    h.reconcile("orders").await.expect("rotated");
    assert_ne!(secret_hash(&h, "orders"), before);
    assert!(
        h.api
            .list(EVENTS)
            .iter()
            .any(|e| e["reason"] == "SecretRotated")
    );
}

#[tokio::test]
async fn disabled_tracing_needs_no_headers_secret_and_keeps_the_hash() {
    let h = harness();
    h.create_secret("orders-db", "url", "postgres://db/orders");
    h.create_relay("minimal.yaml");
    h.reconcile("orders").await.expect("without tracing");
    let without = secret_hash(&h, "orders");
    h.api.delete(RELAYS, "orders");
    h.api.collect_garbage();
    h.api.create(
        RELAYS,
        minimal_with_tracing(json!({
            "enabled": false,
            "endpoint": "http://collector:4317",
            "headersSecretRef": {"name": "missing", "key": "headers"},
        })),
    );
    h.reconcile("orders").await.expect("disabled tracing");
    assert_ne!(cond(&h.relay("orders"), READY).1, "SecretNotFound");
    // Only the referenced Secrets count: disabled tracing leaves the hash alone.
    assert_eq!(secret_hash(&h, "orders"), without);
    let env = &h.deployment("orders")["spec"]["template"]["spec"]["containers"][0]["env"];
    let otel: Vec<&Value> = env
        .as_array()
        .expect("env")
        .iter()
        .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("OTEL_")))
        .collect();
    assert_eq!(
        otel,
        vec![&json!({"name": "OTEL_SDK_DISABLED", "value": "true"})]
    );
}
