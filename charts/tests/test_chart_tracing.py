"""`tracing` values: the operator's own OpenTelemetry settings become the standard OTEL_*
environment variables of its container (the operator's OTLP exporter reads them), the values
schema refuses what the SDK could not use, and resource attributes are encoded as the
operator encodes them for the workers."""

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import KUBERNETES_VERSIONS, NAMESPACE, REPO_DIR, by_kind, render, run_operator

ENDPOINT = "http://otel-collector.observability.svc:4317"


def env_list(rendered):
    container = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container["env"]


def otel(rendered):
    return [e for e in env_list(rendered) if e["name"].startswith("OTEL_")]


def otel_values(rendered):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in otel(rendered)}


def attributes(text):
    return dict(pair.split("=", 1) for pair in text.split(","))


def test_disabled_by_default_sets_no_otel_env(default_render):
    assert otel(default_render) == []


def test_endpoint_set_but_disabled_sets_no_otel_env():
    assert otel(render({"tracing": {"enabled": False, "endpoint": ENDPOINT}})) == []


def test_full_values(full_render):
    e = otel_values(full_render)
    assert e == {
        "OTEL_SERVICE_NAME": "outbox-operator-prod",
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_HEADERS": {
            "secretKeyRef": {"name": "otlp-auth", "key": "headers", "optional": False}
        },
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "OTEL_RESOURCE_ATTRIBUTES": e["OTEL_RESOURCE_ATTRIBUTES"],
    }
    assert attributes(e["OTEL_RESOURCE_ATTRIBUTES"]) == {
        "deployment.environment.name": "prod",
        "k8s.deployment.name": "outbox-operator-full",
        "k8s.namespace.name": NAMESPACE,
        "k8s.pod.name": "$(POD_NAME)",
        "team": "platform%20&%20data",
    }


def test_minimal_tracing_and_env_order():
    rendered = render({"tracing": {"enabled": True, "endpoint": ENDPOINT}})
    assert otel_values(rendered) == {
        "OTEL_SERVICE_NAME": "outbox-operator",
        "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
        "OTEL_RESOURCE_ATTRIBUTES": "k8s.deployment.name=outbox-operator,"
        f"k8s.namespace.name={NAMESPACE},k8s.pod.name=$(POD_NAME)",
    }
    names = [e["name"] for e in env_list(rendered)]
    # The kubelet only expands $(POD_NAME) when POD_NAME is defined earlier.
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(by_kind(rendered, "Deployment"), version, strict=True)


def test_service_name_falls_back_to_the_service_name_attribute():
    rendered = render(
        {"tracing": {"enabled": True, "endpoint": ENDPOINT, "resourceAttributes": {"service.name": "ops"}}}
    )
    assert otel_values(rendered)["OTEL_SERVICE_NAME"] == "ops"


def test_resource_attributes_are_encoded_and_replace_added_keys():
    rendered = render(
        {
            "tracing": {
                "enabled": True,
                "endpoint": ENDPOINT,
                "serviceName": "op$(X)",
                "resourceAttributes": {
                    "k8s.namespace.name": "elsewhere",
                    "odd": 'a b,c;d"e\\f%g=h&$(POD_NAME)',
                },
            }
        }
    )
    e = otel_values(rendered)
    assert e["OTEL_SERVICE_NAME"] == "op$$(X)"
    attrs = attributes(e["OTEL_RESOURCE_ATTRIBUTES"])
    assert attrs["k8s.namespace.name"] == "elsewhere"
    assert attrs["odd"] == "a%20b%2Cc%3Bd%22e%5Cf%25g=h&$$(POD_NAME)"


@pytest.mark.parametrize("arg, text", [(0, "0"), (1, "1"), (0.25, "0.25"), ("0.5", "0.5")])
def test_sampler_arg(arg, text):
    rendered = render(
        {"tracing": {"enabled": True, "endpoint": ENDPOINT, "sampler": "traceidratio", "samplerArg": arg}}
    )
    assert otel_values(rendered)["OTEL_TRACES_SAMPLER_ARG"] == text


def test_attribute_encoding_matches_the_operator(tmp_path):
    """The chart (for the operator) and the operator (for the workers) write the same
    OTEL_RESOURCE_ATTRIBUTES pairs for the same printable-ASCII values."""
    values = {
        "team": "billing & payments",
        "odd": 'a b,c;d"e\\f%g=h',
        "region": "europe-west1",
    }
    chart = attributes(
        otel_values(render({"tracing": {"enabled": True, "endpoint": ENDPOINT, "resourceAttributes": values}}))[
            "OTEL_RESOURCE_ATTRIBUTES"
        ]
    )
    relay = yaml.safe_load((REPO_DIR / "operator" / "examples" / "minimal.yaml").read_text())
    relay["spec"]["tracing"] = {"endpoint": ENDPOINT, "resourceAttributes": values}
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(relay))
    docs = [d for d in yaml.safe_load_all(run_operator("render", "-f", str(path)).stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    worker_env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    worker = attributes(worker_env["OTEL_RESOURCE_ATTRIBUTES"])
    for key in values:
        assert chart[key] == worker[key], key


@pytest.mark.parametrize(
    "tracing, message",
    [
        ({"enabled": True}, "/tracing/endpoint"),
        ({"enabled": True, "endpoint": "otel-collector:4317"}, "/tracing/endpoint"),
        ({"enabled": True, "endpoint": "grpc://otel-collector:4317"}, "/tracing/endpoint"),
        ({"enabled": True, "endpoint": "https://user:pw@otlp.example.com"}, "/tracing/endpoint"),
        ({"enabled": True, "endpoint": ENDPOINT, "protocol": "http/json"}, "/tracing/protocol"),
        ({"enabled": True, "endpoint": ENDPOINT, "sampler": "sometimes"}, "/tracing/sampler"),
        ({"enabled": True, "endpoint": ENDPOINT, "sampler": "traceidratio", "samplerArg": 1.5}, "/tracing/samplerArg"),
        ({"enabled": True, "endpoint": ENDPOINT, "sampler": "traceidratio", "samplerArg": "half"}, "/tracing/samplerArg"),
        ({"enabled": True, "endpoint": ENDPOINT, "sampler": "always_on", "samplerArg": 0.5}, "/tracing/sampler"),
        ({"enabled": True, "endpoint": ENDPOINT, "samplerArg": 0.5}, "/tracing"),
        # propertyNames errors carry no path in Helm's validator, only the name.
        ({"enabled": True, "endpoint": ENDPOINT, "resourceAttributes": {"bad key": "v"}}, "invalid propertyName 'bad key'"),
        ({"enabled": True, "endpoint": ENDPOINT, "resourceAttributes": {"city": "zürich"}}, "/tracing/resourceAttributes/city"),
        ({"enabled": True, "endpoint": ENDPOINT, "headersSecretRef": {"name": "otlp"}}, "/tracing/headersSecretRef"),
        ({"enabled": True, "endpoint": ENDPOINT, "headersSecretRef": {"name": "Bad_Name", "key": "h"}}, "/tracing/headersSecretRef/name"),
        ({"enabled": "yes"}, "/tracing/enabled"),
        ({"enabled": True, "endpoint": ENDPOINT, "unknown": 1}, "unknown"),
    ],
)
def test_values_schema_refuses(tracing, message):
    with pytest.raises(helm.HelmError, match=message):
        render({"tracing": tracing})
