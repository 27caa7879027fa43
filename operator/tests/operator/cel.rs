//! The CRD's CEL rules (`x-kubernetes-validations`) evaluated offline with kube's CEL
//! evaluator (kube-cel), and cross-checked against `crd::validate`, which mirrors them.
//!
//! kube-cel implements the Kubernetes CEL libraries and applies schema defaults first, as
//! the API server does; it is still not the API server (cost limits, exact messages).

use kube::CustomResourceExt;
use kube::core::cel::{Validator, compile_schema};
use outbox_operator::crd::{OutboxRelay, validate};
use serde_json::{Value, json};

use crate::common::{crate_dir, example_text};

fn schema() -> Value {
    let crd = serde_json::to_value(OutboxRelay::crd()).expect("crd json");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn sample(name: &str) -> Value {
    serde_norway::from_str(&example_text(name)).expect("yaml")
}

/// CEL errors as `field: message` strings.
fn cel_errors(object: &Value) -> Vec<String> {
    match Validator::new().validate(&schema(), object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn every_rule_compiles() {
    let compiled = compile_schema(&schema());
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
}

#[test]
fn valid_samples_pass_cel() {
    for name in ["minimal.yaml", "full.yaml", "dev.yaml"] {
        assert_eq!(cel_errors(&sample(name)), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn cel_only_samples_fail_cel_naming_the_field() {
    let mut names: Vec<String> = std::fs::read_dir(crate_dir().join("examples"))
        .expect("examples")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("invalid-cel-"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 7, "{names:?}");
    for name in names {
        let text = example_text(&name);
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect-error: "))
            .expect("expect-error")
            .trim()
            .to_owned();
        let errors = cel_errors(&sample(&name));
        assert!(!errors.is_empty(), "{name} passed CEL");
        let joined = errors.join("; ");
        assert!(
            joined.contains(&field),
            "{name}: {joined} does not name {field}"
        );
    }
}

fn relay_with(f: impl FnOnce(&mut Value)) -> Value {
    let mut v = sample("minimal.yaml");
    f(&mut v);
    v
}

/// The Rust mirror and the CEL rules agree.
fn agree(object: &Value) {
    let cel_ok = cel_errors(object).is_empty();
    let relay: OutboxRelay = serde_json::from_value(object.clone()).expect("relay");
    let rust_ok = validate(&relay).is_ok();
    assert_eq!(
        cel_ok,
        rust_ok,
        "CEL {:?} vs validate {:?} for {object}",
        cel_errors(object),
        validate(&relay)
    );
}

#[test]
fn leader_election_rule_agrees_with_validate() {
    for (lease, renew, retry) in [
        ("15s", "10s", "2s"),
        ("1m", "45s", "5s"),
        ("1m30s", "1m", "500ms"),
        ("1h", "59m59s", "1s"),
        ("10s", "10s", "2s"),
        ("10s", "15s", "2s"),
        ("15s", "10s", "10s"),
        ("15s", "10s", "20s"),
        ("2s", "1500ms", "1s"),
    ] {
        agree(&relay_with(|v| {
            v["spec"]["leaderElection"] =
                json!({"leaseDuration": lease, "renewDeadline": renew, "retryPeriod": retry});
        }));
    }
    // Defaults fill the missing timings before the rule runs.
    agree(&relay_with(|v| {
        v["spec"]["leaderElection"] = json!({"leaseDuration": "12s"})
    }));
    agree(&relay_with(|v| {
        v["spec"]["leaderElection"] = json!({"leaseDuration": "9s"})
    }));
    agree(&relay_with(|v| {
        v["spec"]["leaderElection"] = json!({"leaseName": "custom"})
    }));
}

#[test]
fn topic_rule_agrees_with_validate() {
    for topic in [
        "projects/acme-shop-prod/topics/orders",
        "projects/acme-shop-prod/topics/goog",
        "projects/acme-shop-prod/topics/googles",
        "projects/acme-shop-prod/topics/Goog-ok",
        "projects/acme-shop-prod/topics/agoog",
    ] {
        agree(&relay_with(|v| v["spec"]["pubsub"]["topic"] = json!(topic)));
    }
}

#[test]
fn name_rule_agrees_with_validate() {
    for len in [1, 62, 63, 64, 100] {
        agree(&relay_with(|v| {
            v["metadata"]["name"] = json!("a".repeat(len))
        }));
    }
}

#[test]
fn tracing_rules_agree_with_validate() {
    let endpoint = "http://otel-collector.observability.svc:4317";
    for tracing in [
        json!({"endpoint": endpoint}),
        json!({"enabled": false}),
        json!({"enabled": true}),
        json!({"sampler": "always_on"}),
        json!({"endpoint": endpoint, "sampler": "traceidratio", "samplerArg": 0.5}),
        json!({"endpoint": endpoint, "sampler": "parentbased_traceidratio", "samplerArg": 0}),
        json!({"endpoint": endpoint, "sampler": "always_on", "samplerArg": 0.5}),
        json!({"endpoint": endpoint, "sampler": "parentbased_always_off", "samplerArg": 1}),
        json!({"endpoint": endpoint, "samplerArg": 0.5}),
        json!({"endpoint": endpoint, "sampler": "always_on"}),
        json!({"endpoint": endpoint, "resourceAttributes": {"deployment.environment.name": "x y"}}),
        json!({"endpoint": endpoint, "resourceAttributes": {"team name": "x"}}),
        json!({"endpoint": endpoint, "resourceAttributes": {"a=b": "x"}}),
        json!({"endpoint": endpoint, "resourceAttributes": {"": "x"}}),
        json!({"endpoint": "https://otlp.example.com"}),
        json!({"endpoint": "otlp.example.com:4317"}),
        json!({"endpoint": "grpc://otlp.example.com:4317"}),
    ] {
        agree(&relay_with(|v| v["spec"]["tracing"] = tracing.clone()));
    }
}

#[test]
fn tracing_cel_errors_name_the_field_with_the_validate_message() {
    let endpoint = "http://collector:4317";
    for (tracing, expected) in [
        (
            json!({"endpoint": endpoint, "sampler": "always_on", "samplerArg": 0.5}),
            format!(
                "spec.tracing.samplerArg: {}",
                outbox_operator::crd::SAMPLER_ARG_MESSAGE
            ),
        ),
        (
            json!({"sampler": "always_on"}),
            format!(
                "spec.tracing.endpoint: {}",
                outbox_operator::crd::TRACING_ENDPOINT_MESSAGE
            ),
        ),
        (
            json!({"endpoint": "collector:4317"}),
            format!(
                "spec.tracing.endpoint: {}",
                outbox_operator::crd::OTLP_ENDPOINT_MESSAGE
            ),
        ),
        (
            json!({"endpoint": endpoint, "resourceAttributes": {"a b": "c"}}),
            format!(
                "spec.tracing.resourceAttributes: {}",
                outbox_operator::crd::RESOURCE_ATTRIBUTE_KEYS_MESSAGE
            ),
        ),
    ] {
        let object = relay_with(|v| v["spec"]["tracing"] = tracing.clone());
        assert_eq!(cel_errors(&object), vec![expected.clone()], "{tracing}");
        // The Rust mirror reports the same text for the same field.
        let relay: OutboxRelay = serde_json::from_value(object).expect("relay");
        let err = validate(&relay).expect_err("invalid").to_string();
        let (field, message) = expected.split_once(": ").expect("field: message");
        assert!(
            err.contains(field) && err.contains(message),
            "{err} vs {expected}"
        );
    }
}
