//! OutboxRelay → desired objects.

use k8s_openapi::api::core::v1::Container;
use outbox_operator::render::render;
use outbox_operator::resources::{SECRET_HASH_ANNOTATION, desired};
use serde_json::{Value, json};

use crate::common::{assert_golden, example, example_text, settings};

fn container(d: &outbox_operator::resources::Desired) -> Container {
    let pod = d
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.containers.len(), 1);
    pod.containers[0].clone()
}

fn env(c: &Container, name: &str) -> Option<Value> {
    c.env
        .as_ref()
        .and_then(|e| e.iter().find(|v| v.name == name))
        .map(|v| serde_json::to_value(v).expect("env json"))
}

#[test]
fn golden_renders() {
    for name in ["minimal.yaml", "full.yaml", "dev.yaml"] {
        let out = render(&example_text(name), &settings(), "default").expect(name);
        assert_golden(name, &out);
    }
}

#[test]
fn minimal_spec_gets_defaults() {
    let relay = example("minimal.yaml");
    let d = desired(&relay, &settings(), "abc").expect("desired");
    let spec = d.deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let c = container(&d);
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/outbox-dev/outbox-worker:0.0.0-test")
    );
    assert_eq!(c.command, Some(vec!["outbox-worker".to_string()]));
    assert_eq!(
        c.args,
        Some(vec![
            "relay".into(),
            "--leader-election".into(),
            "kubernetes".into()
        ])
    );
    assert_eq!(
        env(&c, "OUTBOX_TABLE"),
        Some(json!({"name": "OUTBOX_TABLE", "value": "outbox"}))
    );
    assert_eq!(
        env(&c, "PUBSUB_TOPIC").and_then(|v| v["value"].as_str().map(str::to_owned)),
        Some("projects/acme-shop-prod/topics/orders".into())
    );
    assert_eq!(
        env(&c, "DATABASE_URL"),
        Some(
            json!({"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "orders-db", "key": "url", "optional": false}}})
        )
    );
    assert_eq!(
        env(&c, "POD_NAME"),
        Some(
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}})
        )
    );
    for (name, value) in [
        ("LEADER_ELECTION", "kubernetes"),
        ("LEASE_NAME", "orders"),
        ("LEASE_DURATION", "15s"),
        ("RENEW_DEADLINE", "10s"),
        ("RETRY_PERIOD", "2s"),
        ("LOG_FORMAT", "json"),
        ("HEALTH_ADDR", "0.0.0.0:8080"),
    ] {
        assert_eq!(
            env(&c, name),
            Some(json!({"name": name, "value": value})),
            "{name}"
        );
    }
    assert!(env(&c, "POD_NAMESPACE").is_some());
    assert!(env(&c, "PUBSUB_EMULATOR_HOST").is_none());
    assert!(env(&c, "GOOGLE_APPLICATION_CREDENTIALS").is_none());
    assert!(env(&c, "BATCH_SIZE").is_none());
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    // replicas 2 > 1 → PDB keeping one.
    let pdb = d.pod_disruption_budget.as_ref().expect("pdb");
    assert_eq!(
        serde_json::to_value(pdb).expect("json")["spec"]["minAvailable"],
        json!(1)
    );
}

#[test]
fn full_spec_is_carried_over() {
    let relay = example("full.yaml");
    let d = desired(&relay, &settings(), "abc").expect("desired");
    let c = container(&d);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/outbox-worker:1.2.3")
    );
    assert_eq!(
        env(&c, "BATCH_SIZE"),
        Some(json!({"name": "BATCH_SIZE", "value": "500"}))
    );
    assert_eq!(
        env(&c, "OUTBOX_TABLE"),
        Some(json!({"name": "OUTBOX_TABLE", "value": "events.outbox"}))
    );
    assert_eq!(
        env(&c, "LEASE_NAME"),
        Some(json!({"name": "LEASE_NAME", "value": "billing-events-relay"}))
    );
    assert_eq!(
        env(&c, "LEASE_DURATION"),
        Some(json!({"name": "LEASE_DURATION", "value": "20s"}))
    );
    assert_eq!(
        env(&c, "GOOGLE_APPLICATION_CREDENTIALS"),
        Some(
            json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/run/secrets/google/key.json"})
        )
    );
    let mounts = serde_json::to_value(c.volume_mounts.as_ref().expect("mounts")).expect("json");
    assert!(
        mounts
            .as_array()
            .expect("array")
            .iter()
            .any(|m| m["mountPath"] == "/var/run/secrets/google" && m["readOnly"] == true)
    );
    let pod = serde_json::to_value(
        d.deployment
            .spec
            .as_ref()
            .expect("spec")
            .template
            .spec
            .as_ref()
            .expect("pod"),
    )
    .expect("json");
    assert_eq!(pod["nodeSelector"]["pool"], "general");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    let creds = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "google-credentials")
        .expect("creds volume");
    assert_eq!(creds["secret"]["secretName"], "billing-pubsub-sa");
    assert_eq!(
        creds["secret"]["items"][0],
        json!({"key": "key.json", "path": "key.json"})
    );
    let res = serde_json::to_value(c.resources.as_ref().expect("resources")).expect("json");
    assert_eq!(res["limits"]["memory"], "512Mi");
    assert_eq!(d.deployment.spec.as_ref().and_then(|s| s.replicas), Some(3));
    // Role grants the lease name from the spec.
    let role = serde_json::to_value(&d.role).expect("json");
    assert_eq!(
        role["rules"][0]["resourceNames"],
        json!(["billing-events-relay"])
    );
    let labels = d.deployment.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get("app.kubernetes.io/version").map(String::as_str),
        Some("1.2.3")
    );
}

#[test]
fn single_replica_has_no_pdb_and_emulator_env() {
    let relay = example("dev.yaml");
    let d = desired(&relay, &settings(), "abc").expect("desired");
    assert!(d.pod_disruption_budget.is_none());
    assert_eq!(d.to_values().expect("values").len(), 4);
    let c = container(&d);
    assert_eq!(
        env(&c, "PUBSUB_EMULATOR_HOST"),
        Some(json!({"name": "PUBSUB_EMULATOR_HOST", "value": "pubsub-emulator.dev.svc:8085"}))
    );
}

#[test]
fn security_context_and_probes() {
    for name in ["minimal.yaml", "full.yaml", "dev.yaml"] {
        let d = desired(&example(name), &settings(), "abc").expect("desired");
        let dep = serde_json::to_value(&d.deployment).expect("json");
        let pod = &dep["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "http");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(
            c["ports"][0],
            json!({"name": "http", "containerPort": 8080, "protocol": "TCP"})
        );
        assert!(c["resources"]["requests"]["cpu"].is_string());
        assert_eq!(pod["terminationGracePeriodSeconds"], 30);
        // /tmp is writable even with a read-only root filesystem.
        assert!(
            c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|m| m["mountPath"] == "/tmp")
        );
        assert_eq!(pod["serviceAccountName"], dep["metadata"]["name"]);
        assert_eq!(
            dep["spec"]["template"]["metadata"]["annotations"][SECRET_HASH_ANNOTATION],
            "abc"
        );
    }
}

#[test]
fn labels_and_owner_references_on_every_object() {
    for name in ["minimal.yaml", "full.yaml", "dev.yaml"] {
        let relay = example(name);
        let d = desired(&relay, &settings(), "abc").expect("desired");
        for obj in d.to_values().expect("values") {
            let kind = obj["kind"].as_str().expect("kind").to_owned();
            let meta = &obj["metadata"];
            assert_eq!(
                meta["namespace"],
                json!(relay.metadata.namespace),
                "{name} {kind}"
            );
            let labels = &meta["labels"];
            assert_eq!(labels["app.kubernetes.io/name"], "outbox-worker", "{kind}");
            assert_eq!(
                labels["app.kubernetes.io/instance"],
                json!(relay.metadata.name),
                "{kind}"
            );
            assert_eq!(
                labels["app.kubernetes.io/managed-by"], "outbox-operator",
                "{kind}"
            );
            assert_eq!(labels["app.kubernetes.io/component"], "relay", "{kind}");
            assert_eq!(
                labels["app.kubernetes.io/part-of"], "pubsub-outbox",
                "{kind}"
            );
            let owners = meta["ownerReferences"].as_array().expect("owners");
            assert_eq!(owners.len(), 1, "{kind}");
            assert_eq!(
                owners[0],
                json!({
                    "apiVersion": "outbox.dev/v1alpha1",
                    "kind": "OutboxRelay",
                    "name": relay.metadata.name,
                    "uid": "11111111-2222-3333-4444-555555555555",
                    "controller": true,
                    "blockOwnerDeletion": true,
                }),
                "{kind}"
            );
        }
        // Selector labels are a subset of the pod labels.
        let dep = serde_json::to_value(&d.deployment).expect("json");
        let selector = dep["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector")
            .clone();
        for (k, v) in selector {
            assert_eq!(dep["spec"]["template"]["metadata"]["labels"][&k], v);
        }
    }
}

#[test]
fn role_allows_only_leases() {
    let d = desired(&example("minimal.yaml"), &settings(), "abc").expect("desired");
    let role = serde_json::to_value(&d.role).expect("json");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["orders"], "verbs": ["get", "update", "patch"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        ])
    );
    let rb = serde_json::to_value(&d.role_binding).expect("json");
    assert_eq!(
        rb["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "orders"})
    );
    assert_eq!(
        rb["subjects"],
        json!([{"kind": "ServiceAccount", "name": "orders", "namespace": "shop"}])
    );
}

#[test]
fn secret_hash_changes_the_pod_template_only() {
    let relay = example("minimal.yaml");
    let a = desired(&relay, &settings(), "hash-a").expect("a");
    let b = desired(&relay, &settings(), "hash-b").expect("b");
    assert_ne!(a.deployment, b.deployment);
    assert_eq!(a.role, b.role);
    let mut a_spec = a.deployment.spec.clone().expect("spec");
    let b_spec = b.deployment.spec.clone().expect("spec");
    if let Some(m) = a_spec.template.metadata.as_mut() {
        m.annotations
            .as_mut()
            .expect("annotations")
            .insert(SECRET_HASH_ANNOTATION.into(), "hash-b".into());
    }
    assert_eq!(a_spec, b_spec);
}
