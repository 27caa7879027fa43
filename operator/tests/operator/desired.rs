//! OutboxRelay → desired objects.

use k8s_openapi::api::core::v1::Container;
use outbox_operator::crd::OutboxRelay;
use outbox_operator::render::render;
use outbox_operator::resources::{
    SECRET_HASH_ANNOTATION, desired, encode_resource_attribute_value, tracing_env,
};
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

fn otel_env(c: &Container) -> Vec<Value> {
    c.env
        .as_ref()
        .expect("env")
        .iter()
        .filter(|v| v.name.starts_with("OTEL_"))
        .map(|v| serde_json::to_value(v).expect("env json"))
        .collect()
}

fn with_tracing(tracing: Value) -> OutboxRelay {
    let mut relay = example("minimal.yaml");
    relay.spec.tracing = Some(serde_json::from_value(tracing).expect("tracing"));
    relay
}

fn value(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

#[test]
fn no_tracing_section_sets_no_otel_env() {
    for name in ["minimal.yaml", "dev.yaml"] {
        let relay = example(name);
        assert_eq!(tracing_env(&relay), Vec::new(), "{name}");
        let d = desired(&relay, &settings(), "abc").expect("desired");
        assert_eq!(otel_env(&container(&d)), Vec::<Value>::new(), "{name}");
    }
}

#[test]
fn disabled_tracing_only_disables_the_sdk() {
    for tracing in [
        json!({"enabled": false}),
        json!({"enabled": false, "endpoint": "http://collector:4317", "sampler": "always_on",
               "headersSecretRef": {"name": "otlp", "key": "headers"}}),
    ] {
        let relay = with_tracing(tracing.clone());
        let d = desired(&relay, &settings(), "abc").expect("desired");
        assert_eq!(
            otel_env(&container(&d)),
            vec![value("OTEL_SDK_DISABLED", "true")],
            "{tracing}"
        );
    }
}

#[test]
fn endpoint_alone_gets_the_relay_name_and_kubernetes_attributes() {
    let relay = with_tracing(json!({"endpoint": "http://otel-collector.observability.svc:4317"}));
    let d = desired(&relay, &settings(), "abc").expect("desired");
    let c = container(&d);
    assert_eq!(
        otel_env(&c),
        vec![
            value("OTEL_SERVICE_NAME", "orders"),
            value(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "http://otel-collector.observability.svc:4317"
            ),
            value(
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.namespace.name=shop,k8s.deployment.name=orders,k8s.pod.name=$(POD_NAME)"
            ),
        ]
    );
    // $(POD_NAME) is only expanded by the kubelet when POD_NAME is defined earlier.
    let names: Vec<&str> = c
        .env
        .as_ref()
        .expect("env")
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    let pos = |n: &str| names.iter().position(|x| *x == n).expect(n);
    assert!(
        pos("POD_NAME") < pos("OTEL_RESOURCE_ATTRIBUTES"),
        "{names:?}"
    );
}

#[test]
fn service_name_defaults_to_the_service_name_attribute_then_the_relay_name() {
    let endpoint = "http://collector:4317";
    let service_name = |tracing: Value| {
        tracing_env(&with_tracing(tracing))
            .into_iter()
            .find(|e| e.name == "OTEL_SERVICE_NAME")
            .and_then(|e| e.value)
    };
    assert_eq!(
        service_name(json!({"endpoint": endpoint})).as_deref(),
        Some("orders")
    );
    assert_eq!(
        service_name(json!({"endpoint": endpoint, "serviceName": "shop-relay"})).as_deref(),
        Some("shop-relay")
    );
    assert_eq!(
        service_name(
            json!({"endpoint": endpoint, "resourceAttributes": {"service.name": "from-attr"}})
        )
        .as_deref(),
        Some("from-attr")
    );
    assert_eq!(
        service_name(json!({"endpoint": endpoint, "serviceName": "explicit",
                            "resourceAttributes": {"service.name": "from-attr"}}))
        .as_deref(),
        Some("explicit")
    );
    // A literal `$(...)` is escaped so that the kubelet does not expand it.
    assert_eq!(
        service_name(json!({"endpoint": endpoint, "serviceName": "a$(POD_NAME)"})).as_deref(),
        Some("a$$(POD_NAME)")
    );
}

#[test]
fn resource_attribute_values_are_percent_encoded() {
    // Outside the W3C baggage-octet range: controls, space, '"', ',', ';', '\' and
    // non-ASCII (as UTF-8 bytes); '%' too, so that decoding is unambiguous. '=' and the
    // other printable characters stay as they are.
    for (raw, encoded) in [
        ("production", "production"),
        ("billing & payments", "billing%20&%20payments"),
        ("a,b;c", "a%2Cb%3Bc"),
        ("say \"hi\"", "say%20%22hi%22"),
        (r"C:\temp", "C:%5Ctemp"),
        ("100%", "100%25"),
        ("k=v", "k=v"),
        ("zürich", "z%C3%BCrich"),
        ("tab\there\n", "tab%09here%0A"),
        ("~!#$&'()*+-./:<>?@[]^_`{|}", "~!#$&'()*+-./:<>?@[]^_`{|}"),
        ("", ""),
    ] {
        assert_eq!(encode_resource_attribute_value(raw), encoded, "{raw:?}");
    }
    let relay = with_tracing(json!({
        "endpoint": "http://collector:4317",
        "resourceAttributes": {
            "team": "billing & payments",
            "deployment.environment.name": "prod,eu",
            "k8s.deployment.name": "replaced",
            "note": "$(POD_NAME)",
        },
    }));
    let attrs = tracing_env(&relay)
        .into_iter()
        .find(|e| e.name == "OTEL_RESOURCE_ATTRIBUTES")
        .and_then(|e| e.value)
        .expect("attributes");
    // Added keys first (a given key replaces its value in place), then the spec's in key
    // order; `$` doubled so the kubelet keeps it literal.
    assert_eq!(
        attrs,
        "k8s.namespace.name=shop,k8s.deployment.name=replaced,k8s.pod.name=$(POD_NAME),\
         deployment.environment.name=prod%2Ceu,note=$$(POD_NAME),team=billing%20&%20payments"
    );
}

#[test]
fn sampler_ratio_is_written_as_a_decimal_string() {
    for (ratio, text) in [
        (json!(0.25), "0.25"),
        (json!(0.1), "0.1"),
        (json!(0), "0"),
        (json!(1), "1"),
        (json!(1.0), "1"),
        (json!(0.0001), "0.0001"),
        (json!(1e-7), "0.0000001"),
    ] {
        let relay = with_tracing(json!({
            "endpoint": "http://collector:4317",
            "sampler": "traceidratio",
            "samplerArg": ratio,
        }));
        let env = tracing_env(&relay);
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(get("OTEL_TRACES_SAMPLER").as_deref(), Some("traceidratio"));
        assert_eq!(
            get("OTEL_TRACES_SAMPLER_ARG").as_deref(),
            Some(text),
            "{ratio}"
        );
    }
    // No ratio: no OTEL_TRACES_SAMPLER_ARG (the SDK's default, 1).
    let env = tracing_env(&with_tracing(
        json!({"endpoint": "http://collector:4317", "sampler": "parentbased_always_off"}),
    ));
    assert!(env.iter().all(|e| e.name != "OTEL_TRACES_SAMPLER_ARG"));
    assert!(
        env.iter().any(|e| e.name == "OTEL_TRACES_SAMPLER"
            && e.value.as_deref() == Some("parentbased_always_off"))
    );
}

#[test]
fn full_example_tracing_env() {
    let d = desired(&example("full.yaml"), &settings(), "abc").expect("desired");
    assert_eq!(
        otel_env(&container(&d)),
        vec![
            value("OTEL_SERVICE_NAME", "billing-outbox-relay"),
            value(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://otel-collector.observability.svc:4318"
            ),
            value("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            json!({"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef":
                {"name": "billing-otlp", "key": "headers", "optional": false}}}),
            value("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            value("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            value(
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.namespace.name=billing,k8s.deployment.name=billing-events,\
                 k8s.pod.name=$(POD_NAME),deployment.environment.name=production,\
                 team=billing%20&%20payments"
            ),
        ]
    );
}
