//! `InboxRelay`: the same kinds of checks `OutboxRelay` has (golden renders, validation,
//! the CRD's CEL rules offline, the desired objects), for the inbox side.

use k8s_openapi::api::core::v1::Container;
use kube::CustomResourceExt;
use kube::core::cel::{Validator, compile_schema};
use outbox_operator::crd::{InboxRelay, validate_inbox};
use outbox_operator::render::render;
use outbox_operator::resources::{Desired, desired};
use serde_json::{Value, json};

use crate::common::{assert_golden, crate_dir, example_text, inbox_example, settings};

const VALID: [&str; 3] = ["minimal.yaml", "full.yaml", "unordered.yaml"];

fn text(name: &str) -> String {
    example_text(&format!("inbox/{name}"))
}

fn samples(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(crate_dir().join("examples/inbox"))
        .expect("examples/inbox")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

fn expected_field(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("# expect-error: "))
        .expect("invalid samples start with `# expect-error: FIELD`")
        .trim()
        .to_owned()
}

fn cel_errors(object: &Value) -> Vec<String> {
    let crd = serde_json::to_value(InboxRelay::crd()).expect("crd json");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    match Validator::new().validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn container(d: &Desired) -> Container {
    let pod = d
        .deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    pod.containers[0].clone()
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.value.clone())
}

#[test]
fn inbox_golden_renders() {
    for name in VALID {
        let out = render(&text(name), &settings(), "default").expect(name);
        assert_golden(&format!("inbox-{name}"), &out);
    }
}

#[test]
fn inbox_valid_samples_validate_and_pass_cel() {
    let crd = serde_json::to_value(InboxRelay::crd()).expect("crd json");
    let compiled = compile_schema(&crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]);
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    for name in VALID {
        validate_inbox(&inbox_example(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let object: Value = serde_norway::from_str(&text(name)).expect("yaml");
        assert_eq!(cel_errors(&object), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn inbox_invalid_samples_are_refused_naming_the_field() {
    let names = samples("invalid-");
    assert!(names.len() >= 5, "{names:?}");
    for name in names {
        let text = text(&name);
        let field = expected_field(&text);
        let err = render(&text, &settings(), "default")
            .expect_err(&name)
            .to_string();
        assert!(
            err.contains(&field),
            "{name}: {err:?} does not name {field}"
        );
        assert!(err.contains("invalid InboxRelay"), "{name}: {err}");
        if name.starts_with("invalid-cel-") {
            let object: Value = serde_norway::from_str(&text).expect("yaml");
            let joined = cel_errors(&object).join("; ");
            assert!(joined.contains(&field), "{name}: CEL said {joined:?}");
        }
    }
}

#[test]
fn inbox_objects_are_named_apart_from_a_relay_of_the_same_name() {
    let inbox = inbox_example("minimal.yaml");
    let d = desired(&inbox, &settings(), "abc").expect("desired");
    for obj in d.to_values().expect("values") {
        assert_eq!(obj["metadata"]["name"], "orders-inbox", "{}", obj["kind"]);
        assert_eq!(
            obj["metadata"]["labels"]["app.kubernetes.io/component"],
            "inbox"
        );
        assert_eq!(obj["metadata"]["ownerReferences"][0]["kind"], "InboxRelay");
    }
    // The Deployment's selector differs from an OutboxRelay "orders" one: neither selects
    // the other's pods.
    let selector = serde_json::to_value(&d.deployment).expect("json")["spec"]["selector"].clone();
    assert_eq!(
        selector,
        json!({"matchLabels": {
            "app.kubernetes.io/instance": "orders",
            "app.kubernetes.io/name": "outbox-inbox-worker"
        }})
    );
}

#[test]
fn inbox_worker_elects_a_leader_on_its_own_lease() {
    let d = desired(&inbox_example("minimal.yaml"), &settings(), "abc").expect("desired");
    let c = container(&d);
    assert_eq!(c.name, "inbox");
    assert_eq!(
        c.args,
        Some(vec![
            "inbox".into(),
            "--leader-election".into(),
            "kubernetes".into()
        ])
    );
    for (name, value) in [
        (
            "PUBSUB_SUBSCRIPTION",
            "projects/acme-shop-prod/subscriptions/orders-billing",
        ),
        ("INBOX_TABLE", "inbox"),
        ("LEADER_ELECTION", "kubernetes"),
        ("LEASE_NAME", "orders-inbox"),
        ("LEASE_OWNER_KIND", "InboxRelay"),
        ("LEASE_OWNER_NAME", "orders"),
        ("LEASE_OWNER_UID", "66666666-7777-8888-9999-000000000000"),
    ] {
        assert_eq!(env_value(&c, name).as_deref(), Some(value), "{name}");
    }
    assert_eq!(env_value(&c, "PUBSUB_TOPIC"), None);
    let role = serde_json::to_value(&d.role).expect("json");
    assert_eq!(role["rules"][0]["resourceNames"], json!(["orders-inbox"]));
    assert!(d.pod_disruption_budget.is_some(), "2 replicas get a PDB");
}

#[test]
fn inbox_full_spec_is_carried_over() {
    let d = desired(&inbox_example("full.yaml"), &settings(), "abc").expect("desired");
    let c = container(&d);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/outbox-worker:1.2.3")
    );
    for (name, value) in [
        ("INBOX_TABLE", "billing.inbox"),
        ("INBOX_BATCH_SIZE", "250"),
        ("INBOX_STREAMS", "4"),
        ("LEASE_NAME", "billing-inbox-leader"),
        ("LEASE_DURATION", "20s"),
        ("OTEL_SERVICE_NAME", "billing-events-inbox"),
        (
            "GOOGLE_APPLICATION_CREDENTIALS",
            "/var/run/secrets/google/key.json",
        ),
    ] {
        assert_eq!(env_value(&c, name).as_deref(), Some(value), "{name}");
    }
    let role = serde_json::to_value(&d.role).expect("json");
    assert_eq!(
        role["rules"][0]["resourceNames"],
        json!(["billing-inbox-leader"])
    );
}

#[test]
fn unordered_inbox_without_election_runs_every_replica_and_needs_no_lease() {
    let d = desired(&inbox_example("unordered.yaml"), &settings(), "abc").expect("desired");
    let c = container(&d);
    assert_eq!(env_value(&c, "LEADER_ELECTION").as_deref(), Some("none"));
    assert_eq!(
        c.args,
        Some(vec![
            "inbox".into(),
            "--leader-election".into(),
            "none".into()
        ])
    );
    for name in ["LEASE_NAME", "LEASE_OWNER_UID", "LEASE_DURATION"] {
        assert_eq!(env_value(&c, name), None, "{name}");
    }
}
