//! Sample resources and the validation rules (including the logic of the CEL rules, which
//! cannot be evaluated offline against the CRD).

use outbox_operator::crd::{OutboxRelay, parse_duration, validate};
use outbox_operator::render::render;
use std::time::Duration;

use crate::common::{crate_dir, example, settings};

fn samples(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(crate_dir().join("examples"))
        .expect("examples dir")
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

#[test]
fn valid_samples_validate() {
    for name in ["minimal.yaml", "full.yaml", "dev.yaml"] {
        validate(&example(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn invalid_samples_are_refused_naming_the_field() {
    let names = samples("invalid-");
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let text = std::fs::read_to_string(crate_dir().join("examples").join(&name)).expect("read");
        let field = expected_field(&text);
        // Parse errors (a missing required field) and validation errors both name the field.
        let err = render(&text, &settings(), "default")
            .expect_err(&name)
            .to_string();
        assert!(
            err.contains(&field),
            "{name}: {err:?} does not name {field}"
        );
        // Reconcile sees exactly the same message as render.
        if let Ok(relay) = serde_norway::from_str::<OutboxRelay>(&text) {
            let invalid = validate(&relay).expect_err(&name);
            assert!(
                err.contains(&invalid.to_string()),
                "{name}: render {err:?} vs validate {invalid}"
            );
        }
    }
}

#[test]
fn sql_identifiers() {
    let mut relay = example("minimal.yaml");
    for ok in [
        "outbox",
        "_outbox",
        "public.outbox",
        "Events.Outbox_2",
        &"a".repeat(63),
    ] {
        relay.spec.database.table = ok.to_string();
        assert!(validate(&relay).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "1outbox",
        "out-box",
        "a.b.c",
        "public.",
        "outbox;drop",
        "\"quoted\"",
        &"a".repeat(64),
    ] {
        relay.spec.database.table = bad.to_string();
        let err = validate(&relay).expect_err(bad).to_string();
        assert!(err.contains("spec.database.table"), "{bad}: {err}");
    }
}

#[test]
fn topics() {
    let mut relay = example("minimal.yaml");
    for ok in [
        "projects/my-project/topics/orders",
        "projects/abcdef/topics/a.b_c~d%e+f-g",
        "projects/acme-shop-prod/topics/Goog-is-ok-when-capitalised",
    ] {
        relay.spec.pubsub.topic = ok.to_string();
        assert!(validate(&relay).is_ok(), "{ok}");
    }
    for bad in [
        "orders",
        "projects/my-project/topics/",
        "projects/My-Project/topics/orders",
        "projects/abc/topics/orders",
        "projects/my-project/topics/or",
        "projects/my-project/topics/1orders",
        "projects/my-project/subscriptions/orders",
        "projects/my-project/topics/goog-orders",
        "projects/my-project/topics/google",
    ] {
        relay.spec.pubsub.topic = bad.to_string();
        let err = validate(&relay).expect_err(bad).to_string();
        assert!(err.contains("spec.pubsub.topic"), "{bad}: {err}");
    }
}

#[test]
fn leader_election_timings_cel_logic() {
    // Mirrors: duration(renewDeadline) < duration(leaseDuration) && duration(retryPeriod) < duration(renewDeadline)
    let mut relay = example("full.yaml");
    for (lease, renew, retry, ok) in [
        ("15s", "10s", "2s", true),
        ("1m", "45s", "5s", true),
        ("1m30s", "1m", "500ms", true),
        ("10s", "10s", "2s", false),
        ("10s", "15s", "2s", false),
        ("15s", "10s", "10s", false),
        ("15s", "10s", "20s", false),
    ] {
        let le = relay.spec.leader_election.as_mut().expect("le");
        le.lease_duration = lease.into();
        le.renew_deadline = renew.into();
        le.retry_period = retry.into();
        let result = validate(&relay);
        assert_eq!(result.is_ok(), ok, "{lease} {renew} {retry}: {result:?}");
        if let Err(e) = result {
            assert!(e.to_string().contains("spec.leaderElection"), "{e}");
        }
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("15s"), Some(Duration::from_secs(15)));
    assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
    for bad in ["", "15", "s", "1.5s", "-1s", "1 s", "1d"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn name_length_cel_logic() {
    let mut relay = example("minimal.yaml");
    relay.metadata.name = Some("a".repeat(63));
    assert!(validate(&relay).is_ok());
    relay.metadata.name = Some("a".repeat(64));
    assert!(
        validate(&relay)
            .expect_err("64")
            .to_string()
            .contains("metadata.name")
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let mut relay = example("minimal.yaml");
    relay.spec.replicas = -1;
    relay.spec.batch_size = Some(20_000);
    relay.spec.pubsub.emulator_host = Some("no-port".into());
    let err = validate(&relay).expect_err("invalid").to_string();
    for field in [
        "spec.replicas",
        "spec.batchSize",
        "spec.pubsub.emulatorHost",
    ] {
        assert!(err.contains(field), "{err}");
    }
}

fn with_tracing(tracing: serde_json::Value) -> OutboxRelay {
    let mut relay = example("minimal.yaml");
    relay.spec.tracing = Some(serde_json::from_value(tracing).expect("tracing"));
    relay
}

fn tracing_error(tracing: serde_json::Value) -> Option<String> {
    validate(&with_tracing(tracing))
        .err()
        .map(|e| e.to_string())
}

#[test]
fn tracing_endpoints() {
    for ok in [
        "http://otel-collector.observability.svc:4317",
        "https://otlp.example.com",
        "https://otlp.example.com:443/",
        "http://otel-collector:4318/otlp/v1",
        "http://10.0.0.7:4317",
        "http://[fd00::7]:4317",
        "http://localhost:4317",
    ] {
        assert_eq!(
            tracing_error(serde_json::json!({"endpoint": ok})),
            None,
            "{ok}"
        );
    }
    for bad in [
        "otel-collector.observability.svc:4317",
        "grpc://otel-collector:4317",
        "ftp://collector",
        "http://",
        "http:///v1",
        "https://user:secret@otlp.example.com",
        "http://collector:4317?x=1",
        "http://collector:4317#frag",
        "http://collector:4317/$(POD_NAME)",
        "http://collector name:4317",
        " http://collector:4317",
        &format!("http://{}.com", "a".repeat(1020)),
    ] {
        let err = tracing_error(serde_json::json!({"endpoint": bad})).expect(bad);
        assert!(err.contains("spec.tracing.endpoint"), "{bad}: {err}");
    }
    let err = tracing_error(serde_json::json!({"endpoint": "collector:4317"})).expect("no scheme");
    assert!(err.contains("must be an http:// or https:// URL"), "{err}");
}

#[test]
fn tracing_endpoint_is_required_unless_disabled() {
    let err = tracing_error(serde_json::json!({"sampler": "always_on"})).expect("no endpoint");
    assert!(
        err.contains("spec.tracing.endpoint: endpoint is required unless enabled is false"),
        "{err}"
    );
    assert_eq!(tracing_error(serde_json::json!({"enabled": false})), None);
}

#[test]
fn tracing_sampler_ratio() {
    let endpoint = "http://collector:4317";
    for (sampler, arg, ok) in [
        ("traceidratio", 0.0, true),
        ("traceidratio", 0.5, true),
        ("parentbased_traceidratio", 1.0, true),
        ("traceidratio", 1.5, false),
        ("parentbased_traceidratio", -0.1, false),
        ("always_on", 0.5, false),
        ("parentbased_always_on", 0.5, false),
        ("always_off", 0.0, false),
    ] {
        let err = tracing_error(
            serde_json::json!({"endpoint": endpoint, "sampler": sampler, "samplerArg": arg}),
        );
        assert_eq!(err.is_none(), ok, "{sampler} {arg}: {err:?}");
        if let Some(err) = err {
            assert!(err.contains("spec.tracing.samplerArg"), "{err}");
        }
    }
    // A ratio without any sampler is refused too (the SDK's default sampler takes none).
    let err = tracing_error(serde_json::json!({"endpoint": endpoint, "samplerArg": 0.5}))
        .expect("ratio without sampler");
    assert!(
        err.contains("only valid with sampler traceidratio"),
        "{err}"
    );
    let err = tracing_error(
        serde_json::json!({"endpoint": endpoint, "sampler": "traceidratio", "samplerArg": 2}),
    )
    .expect("out of range");
    assert!(
        err.contains("spec.tracing.samplerArg: must be between 0 and 1"),
        "{err}"
    );
    // Unknown samplers and protocols do not even parse (the schema's enum refuses them).
    for bad in [
        serde_json::json!({"endpoint": endpoint, "sampler": "jaeger_remote"}),
        serde_json::json!({"endpoint": endpoint, "protocol": "http/json"}),
    ] {
        assert!(serde_json::from_value::<outbox_operator::crd::TracingSpec>(bad).is_err());
    }
}

#[test]
fn tracing_resource_attributes_and_names() {
    let endpoint = "http://collector:4317";
    let attrs = |map: serde_json::Value| {
        tracing_error(serde_json::json!({"endpoint": endpoint, "resourceAttributes": map}))
    };
    assert_eq!(
        attrs(serde_json::json!({"deployment.environment.name": "prod", "team_1-x": "a, b; c"})),
        None
    );
    for bad in [
        "team name",
        "",
        "a=b",
        "a,b",
        "k8s.pod.label/app",
        &"a".repeat(256),
    ] {
        let err = attrs(serde_json::json!({ bad: "v" })).expect(bad);
        assert!(
            err.contains("spec.tracing.resourceAttributes"),
            "{bad:?}: {err}"
        );
    }
    let many: serde_json::Map<String, serde_json::Value> = (0..33)
        .map(|i| (format!("k{i}"), serde_json::json!("v")))
        .collect();
    assert!(
        attrs(serde_json::Value::Object(many))
            .expect("33")
            .contains("at most 32 entries")
    );
    let err = attrs(serde_json::json!({"long": "v".repeat(513)})).expect("long value");
    assert!(
        err.contains("spec.tracing.resourceAttributes.long"),
        "{err}"
    );
    let err = tracing_error(serde_json::json!({"endpoint": endpoint, "serviceName": ""}))
        .expect("empty name");
    assert!(err.contains("spec.tracing.serviceName"), "{err}");
    let err = tracing_error(serde_json::json!({"endpoint": endpoint,
        "headersSecretRef": {"name": "Bad_Name", "key": "headers"}}))
    .expect("secret name");
    assert!(err.contains("spec.tracing.headersSecretRef.name"), "{err}");
}
