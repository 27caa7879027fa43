"""Sample OutboxRelays against the CRD's openAPIV3Schema (jsonschema).

jsonschema checks the structural part (types, required, patterns, ranges). The CEL
`x-kubernetes-validations` rules cannot be evaluated offline: the `invalid-cel-*` samples
pass this schema check and are refused by `outbox-operator render`, whose validation
implements the same rules (and is what reconcile reports as InvalidSpec)."""

import jsonschema
import pytest
import yaml

from conftest import (
    EXAMPLES,
    VALID_EXAMPLES,
    expected_field,
    invalid_examples,
    load_example,
    run_operator,
)


def errors(schema, instance):
    validator = jsonschema.Draft7Validator(schema)
    return [
        ".".join(str(p) for p in e.absolute_path) + ": " + e.message
        for e in validator.iter_errors(instance)
    ]


@pytest.mark.parametrize("name", VALID_EXAMPLES)
def test_valid_samples_pass(schema_for, name):
    sample = load_example(name)
    assert errors(schema_for(sample), sample) == []


@pytest.mark.parametrize("name", invalid_examples(cel=False))
def test_invalid_samples_fail_naming_the_field(schema_for, name):
    field = expected_field(EXAMPLES / name)
    sample = load_example(name)
    found = errors(schema_for(sample), sample)
    assert found, f"{name} passed the CRD schema"
    assert any(field in e for e in found), f"{name}: {found} does not name {field}"


@pytest.mark.parametrize("name", invalid_examples(cel=True))
def test_cel_only_samples_pass_the_structural_schema(schema_for, name):
    # Only CEL (server-side) refuses these; see the render test below.
    sample = load_example(name)
    assert errors(schema_for(sample), sample) == []


@pytest.mark.parametrize("name", invalid_examples(cel=False) + invalid_examples(cel=True))
def test_render_refuses_invalid_samples_naming_the_field(name):
    result = run_operator("render", "-f", str(EXAMPLES / name), check=False)
    assert result.returncode != 0, f"render accepted {name}"
    field = expected_field(EXAMPLES / name)
    assert field in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "kind,first", [("OutboxRelay", "TOPIC"), ("InboxRelay", "SUBSCRIPTION")]
)
def test_printer_columns(crds, kind, first):
    columns = crds[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"].upper() for c in columns] == [
        first, "REPLICAS", "READY", "LEADER", "BACKLOG", "LAG", "STATUS", "AGE",
    ]


def test_cel_rules_present(relay_schema):
    spec = relay_schema["properties"]["spec"]["properties"]
    assert spec["pubsub"]["properties"]["topic"]["x-kubernetes-validations"]
    assert spec["leaderElection"]["x-kubernetes-validations"]
    assert relay_schema["x-kubernetes-validations"]
    tracing = spec["tracing"]
    assert [r["fieldPath"] for r in tracing["x-kubernetes-validations"]] == [".endpoint", ".samplerArg"]
    assert tracing["properties"]["endpoint"]["x-kubernetes-validations"]
    assert tracing["properties"]["resourceAttributes"]["x-kubernetes-validations"]


ENDPOINTS = [
    ("http://otel-collector.observability.svc:4317", True),
    ("https://otlp.example.com", True),
    ("https://otlp.example.com:443/otlp/", True),
    ("http://10.0.0.7:4318", True),
    ("http://[fd00::7]:4317", True),
    ("otel-collector.observability.svc:4317", False),
    ("grpc://otel-collector:4317", False),
    ("http://", False),
    ("https://user:secret@otlp.example.com", False),
    ("http://collector:4317?x=1", False),
    ("http://collector:4317/$(POD_NAME)", False),
    ("http://collector name:4317", False),
]


def render_with_tracing(tmp_path, tracing):
    relay = load_example("minimal.yaml")
    relay["spec"]["tracing"] = tracing
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(relay))
    return relay, run_operator("render", "-f", str(path), check=False)


@pytest.mark.parametrize("endpoint, ok", ENDPOINTS)
def test_endpoint_pattern_agrees_with_render(relay_schema, tmp_path, endpoint, ok):
    """The schema pattern (Python's re here, RE2 in the API server) and the operator's
    validation (Rust regex) accept the same endpoints."""
    relay, result = render_with_tracing(tmp_path, {"endpoint": endpoint})
    found = errors(relay_schema, relay)
    assert (found == []) == ok, found
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert all("spec.tracing.endpoint" in e for e in found), found
        assert "spec.tracing.endpoint" in result.stderr


@pytest.mark.parametrize("arg, ok", [(0, True), (0.5, True), (1, True), (1.5, False), (-0.1, False), ("0.5", False)])
def test_sampler_arg_is_a_number_between_0_and_1(relay_schema, tmp_path, arg, ok):
    relay, result = render_with_tracing(
        tmp_path, {"endpoint": "http://collector:4317", "sampler": "traceidratio", "samplerArg": arg}
    )
    found = errors(relay_schema, relay)
    assert (found == []) == ok, found
    assert (result.returncode == 0) == ok, result.stderr


def test_rendered_tracing_env(tmp_path):
    _, result = render_with_tracing(
        tmp_path,
        {"endpoint": "http://collector:4317", "sampler": "traceidratio", "samplerArg": 0.5,
         "resourceAttributes": {"team": "a b"}},
    )
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["OTEL_SERVICE_NAME"] == "orders"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.5"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
        "k8s.namespace.name=shop,k8s.deployment.name=orders,k8s.pod.name=$(POD_NAME),team=a%20b"
    )
