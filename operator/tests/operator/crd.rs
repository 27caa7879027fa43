//! The generated CRD.

use kube::CustomResourceExt;
use outbox_operator::crd::{InboxRelay, OutboxRelay, crd_yaml};
use serde_json::json;

use crate::common::crate_dir;

#[test]
fn crds_dir_matches_generated_crd() {
    for plural in ["outboxrelays", "inboxrelays"] {
        let path = crate_dir().join(format!("../crds/{plural}.outbox.dev.yaml"));
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crd_yaml(Some(plural)).expect("crd yaml");
        assert!(
            on_disk == generated,
            "{} is out of date with the types: run `make crds`",
            path.display()
        );
    }
    // Without a name: both, as two YAML documents.
    let both = crd_yaml(None).expect("both");
    assert_eq!(both.matches("kind: CustomResourceDefinition").count(), 2);
}

#[test]
fn both_kinds_have_a_scale_subresource_for_kubectl_scale_and_hpa() {
    for crd in [
        serde_json::to_value(OutboxRelay::crd()).expect("json"),
        serde_json::to_value(InboxRelay::crd()).expect("json"),
    ] {
        assert_eq!(
            crd["spec"]["versions"][0]["subresources"]["scale"],
            json!({
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector"
            })
        );
    }
}

#[test]
fn inbox_relay_names_and_schema() {
    use outbox_operator::crd;
    let crd = serde_json::to_value(InboxRelay::crd()).expect("json");
    assert_eq!(crd["metadata"]["name"], "inboxrelays.outbox.dev");
    let spec = &crd["spec"];
    assert_eq!(spec["names"]["kind"], "InboxRelay");
    assert_eq!(spec["names"]["shortNames"], json!(["ibr"]));
    assert_eq!(spec["names"]["categories"], json!(["outbox"]));
    let root = &spec["versions"][0]["schema"]["openAPIV3Schema"];
    let s = &root["properties"]["spec"];
    assert_eq!(s["required"], json!(["database", "pubsub"]));
    assert_eq!(
        s["properties"]["database"]["properties"]["table"]["default"],
        "inbox"
    );
    let sub = &s["properties"]["pubsub"]["properties"]["subscription"];
    assert_eq!(sub["pattern"], crd::SUBSCRIPTION_PATTERN);
    assert_eq!(s["properties"]["streams"]["maximum"].as_f64(), Some(16.0));
    assert_eq!(s["properties"]["stalledAfter"]["default"], "5m");
    assert_eq!(
        root["x-kubernetes-validations"][0]["rule"],
        "self.metadata.name.size() <= 57"
    );
    let columns: Vec<&str> = spec["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        columns,
        [
            "Subscription",
            "Replicas",
            "Ready",
            "Leader",
            "Backlog",
            "Lag",
            "Status",
            "Age"
        ]
    );
}

#[test]
fn names_scope_and_subresources() {
    let crd = serde_json::to_value(OutboxRelay::crd()).expect("json");
    assert_eq!(crd["metadata"]["name"], "outboxrelays.outbox.dev");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "outbox.dev");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "OutboxRelay");
    assert_eq!(spec["names"]["plural"], "outboxrelays");
    assert_eq!(spec["names"]["shortNames"], json!(["obr"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["served"], true);
    assert_eq!(version["storage"], true);
    assert_eq!(version["subresources"]["status"], json!({}));
}

#[test]
fn printer_columns() {
    let crd = serde_json::to_value(OutboxRelay::crd()).expect("json");
    let columns = &crd["spec"]["versions"][0]["additionalPrinterColumns"];
    let summary: Vec<(String, String)> = columns
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default().to_uppercase(),
                c["jsonPath"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("TOPIC".to_string(), ".spec.pubsub.topic".to_string()),
            ("REPLICAS".into(), ".spec.replicas".into()),
            ("READY".into(), ".status.readyReplicas".into()),
            ("LEADER".into(), ".status.leader".into()),
            ("BACKLOG".into(), ".status.backlog".into()),
            ("LAG".into(), ".status.oldestPendingAge".into()),
            (
                "STATUS".into(),
                ".status.conditions[?(@.type==\"Ready\")].reason".into()
            ),
            ("AGE".into(), ".metadata.creationTimestamp".into()),
        ]
    );
}

#[test]
fn schema_carries_validation() {
    let crd = serde_json::to_value(OutboxRelay::crd()).expect("json");
    let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let spec = &root["properties"]["spec"];
    assert_eq!(spec["required"], json!(["database", "pubsub"]));
    assert_eq!(spec["properties"]["replicas"]["default"], 2);
    assert_eq!(
        spec["properties"]["replicas"]["minimum"].as_f64(),
        Some(0.0)
    );
    let db = &spec["properties"]["database"];
    assert_eq!(db["properties"]["table"]["default"], "outbox");
    assert_eq!(
        db["properties"]["table"]["pattern"],
        outbox_operator::crd::SQL_IDENTIFIER_PATTERN
    );
    let topic = &spec["properties"]["pubsub"]["properties"]["topic"];
    assert_eq!(topic["pattern"], outbox_operator::crd::TOPIC_PATTERN);
    assert_eq!(
        topic["x-kubernetes-validations"][0]["rule"],
        outbox_operator::crd::TOPIC_NOT_GOOG_RULE
    );
    let le = &spec["properties"]["leaderElection"];
    assert_eq!(
        le["x-kubernetes-validations"][0]["rule"],
        outbox_operator::crd::LEADER_TIMINGS_RULE
    );
    assert_eq!(le["properties"]["leaseDuration"]["default"], "15s");
    assert_eq!(
        root["x-kubernetes-validations"][0]["rule"],
        outbox_operator::crd::NAME_LENGTH_RULE
    );
    let conditions = &root["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

#[test]
fn tracing_schema() {
    use outbox_operator::crd;
    let crd = serde_json::to_value(OutboxRelay::crd()).expect("json");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let tracing = &spec["properties"]["tracing"];
    assert_eq!(tracing["type"], "object");
    let rules: Vec<(&str, &str, &str)> = tracing["x-kubernetes-validations"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().expect("rule"),
                r["message"].as_str().expect("message"),
                r["fieldPath"].as_str().expect("fieldPath"),
            )
        })
        .collect();
    assert_eq!(
        rules,
        vec![
            (
                crd::TRACING_ENDPOINT_RULE,
                crd::TRACING_ENDPOINT_MESSAGE,
                ".endpoint"
            ),
            (
                crd::SAMPLER_ARG_RULE,
                crd::SAMPLER_ARG_MESSAGE,
                ".samplerArg"
            ),
        ]
    );
    let p = &tracing["properties"];
    assert_eq!(p["enabled"]["default"], true);
    assert_eq!(p["endpoint"]["pattern"], crd::OTLP_ENDPOINT_PATTERN);
    assert_eq!(p["endpoint"]["maxLength"], 1024);
    assert_eq!(
        p["endpoint"]["x-kubernetes-validations"][0]["rule"],
        crd::OTLP_ENDPOINT_SCHEME_RULE
    );
    // An optional enum comes out of schemars/kube as `nullable` with `null` among the values
    // (the API server accepts null enum values since Kubernetes 1.20).
    assert_eq!(
        p["protocol"]["enum"],
        json!(["grpc", "http/protobuf", null])
    );
    assert_eq!(p["protocol"]["nullable"], true);
    assert_eq!(
        p["sampler"]["enum"],
        json!([
            "always_on",
            "always_off",
            "traceidratio",
            "parentbased_always_on",
            "parentbased_always_off",
            "parentbased_traceidratio",
            null
        ])
    );
    assert_eq!(p["samplerArg"]["type"], "number");
    assert_eq!(p["samplerArg"]["minimum"].as_f64(), Some(0.0));
    assert_eq!(p["samplerArg"]["maximum"].as_f64(), Some(1.0));
    assert_eq!(p["serviceName"]["maxLength"], 255);
    let attrs = &p["resourceAttributes"];
    assert_eq!(attrs["type"], "object");
    assert_eq!(attrs["maxProperties"], crd::MAX_RESOURCE_ATTRIBUTES);
    assert_eq!(
        attrs["additionalProperties"],
        json!({"type": "string", "maxLength": crd::MAX_RESOURCE_ATTRIBUTE_VALUE})
    );
    assert_eq!(
        attrs["x-kubernetes-validations"][0]["rule"],
        crd::RESOURCE_ATTRIBUTE_KEYS_RULE
    );
    // The CEL rule and the Rust pattern check the same keys.
    assert!(crd::RESOURCE_ATTRIBUTE_KEYS_RULE.contains(crd::RESOURCE_ATTRIBUTE_KEY_PATTERN));
    assert_eq!(p["headersSecretRef"]["required"], json!(["key", "name"]));
}
