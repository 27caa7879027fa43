"""charts/outbox-operator rendered with the real Helm engine: lint, values schema, every
object against the official Kubernetes schemas, and what the Deployment must contain."""

import copy

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import (
    CHART_DIR,
    FULL_VALUES,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    by_kind,
    cargo_version,
    full_values,
    objects,
    render,
    run_operator,
)

DEFAULT_KINDS = [
    "ClusterRole",
    "ClusterRoleBinding",
    "Deployment",
    "PodDisruptionBudget",
    "Service",
    "ServiceAccount",
]
# Kinds the official schemas do not know (checked by shape below).
NOT_IN_OFFICIAL_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def lint_errors(values, kube_version):
    report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=kube_version)
    bad = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    # `icon is recommended` is severity 1 (info): we have no icon.
    return report["errors"] + [f"{m['path']}: {m['error']}" for m in bad]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("which", ["default", "full"])
def test_lint_strict_has_no_warnings_or_errors(which, version):
    values = None if which == "default" else full_values()
    assert lint_errors(values, "v" + version) == []


@pytest.mark.parametrize("which", ["default", "full"])
def test_client_dry_run_install(which):
    """Helm's install action (values schema, Chart.yaml kubeVersion against Helm's default
    capabilities, CRDs, hooks, ordering) offline: no API server is contacted."""
    values = None if which == "default" else full_values()
    with helm.Config(storage_driver="memory", kube_apiserver="http://127.0.0.1:9", namespace=NAMESPACE) as cfg:
        release = cfg.install(CHART_DIR, "outbox-operator", values, namespace=NAMESPACE, dry_run="client")
    installed = sorted(d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d)
    expected = sorted(o["kind"] for o in objects(render(values)))
    assert installed == expected
    assert "kubectl get outboxrelays" in release["notes"]


def test_default_kinds(default_render):
    assert sorted(o["kind"] for o in objects(default_render)) == DEFAULT_KINDS


def test_full_kinds(full_render):
    # watchNamespace: Roles (the watched namespace, the operator's Lease) instead of the ClusterRole.
    cluster_wide = {"ClusterRole", "ClusterRoleBinding"}
    expected = [k for k in DEFAULT_KINDS if k not in cluster_wide] + ["Role", "Role", "RoleBinding", "RoleBinding"]
    assert sorted(o["kind"] for o in objects(full_render)) == sorted(expected + ["ServiceMonitor", "PrometheusRule", "ConfigMap"])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_match_official_schemas(any_render, version):
    for obj in objects(any_render):
        if (obj["apiVersion"], obj["kind"]) in NOT_IN_OFFICIAL_SCHEMAS:
            continue
        # strict: unknown fields are errors. Raises with the offending path.
        kubernetes_validate.validate(obj, version, strict=True)


def test_service_monitor_shape(full_render):
    """monitoring.coreos.com is not in the official schemas: check the fields we set against
    the Prometheus Operator's ServiceMonitor v1 API by hand."""
    sm = by_kind(full_render, "ServiceMonitor")
    service = by_kind(full_render, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert sm["metadata"]["namespace"] == NAMESPACE
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")


def test_service_monitor_needs_the_service():
    values = full_values()
    values["metrics"]["service"]["enabled"] = False
    with pytest.raises(helm.HelmError, match="metrics.service.enabled"):
        render(values)


def container(rendered):
    return by_kind(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(rendered):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(rendered)["env"]}


def test_default_images_follow_the_crate_version(default_render):
    version = cargo_version()
    assert container(default_render)["image"] == f"ghcr.io/outbox-dev/outbox-operator:{version}"
    # The worker image the chart passes equals the operator's own default (DEFAULT_WORKER_IMAGE).
    rendered = run_operator("render", "-f", str(CHART_DIR.parents[1] / "examples" / "outboxrelay.yaml"))
    deployment = next(d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "Deployment")
    worker_default = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert env(default_render)["WORKER_IMAGE"] == worker_default == f"ghcr.io/outbox-dev/outbox-worker:{version}"


def test_chart_version_is_the_crate_version():
    with helm.Chart.load(CHART_DIR) as chart:
        meta = chart.metadata
    assert meta["version"] == meta["appVersion"] == cargo_version()
    assert meta["kubeVersion"] == ">=1.33.0-0"


def test_deployment_defaults(default_render):
    deployment = by_kind(default_render, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    c = container(default_render)
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert c["args"] == ["run"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
    e = env(default_render)
    assert e["LEADER_ELECTION"] == "true"
    assert e["LEASE_NAME"] == "outbox-operator"
    assert e["LOG_FORMAT"] == "json"
    assert e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "WATCH_NAMESPACE" not in e
    # No allowlist: the operator runs only its own worker image.
    assert "IMAGE_ALLOWLIST" not in e
    assert pod["serviceAccountName"] == by_kind(default_render, "ServiceAccount")["metadata"]["name"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_hardened_security_context(any_render):
    """Pod Security `restricted`, and the distroless nonroot user."""
    pod = by_kind(any_render, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "volumes" not in pod


def test_full_values_reach_the_objects(full_render):
    pod = by_kind(full_render, "Deployment")["spec"]["template"]["spec"]
    c = container(full_render)
    e = env(full_render)
    assert c["image"].endswith("@sha256:" + "0123456789abcdef" * 4)  # digest wins over tag
    assert c["imagePullPolicy"] == "Always"
    assert e["WORKER_IMAGE"] == "registry.example.com/outbox/outbox-worker:0.1.0-rc.1"
    assert e["WATCH_NAMESPACE"] == "shop"
    assert e["IMAGE_ALLOWLIST"] == "registry.example.com/outbox/,ghcr.io/outbox-dev/outbox-worker:"
    assert e["LEASE_NAME"] == "outbox-operator-lock"
    assert e["LEASE_DURATION_SECONDS"] == "20"
    assert e["RUST_LOG"] == "info,outbox_operator=debug"
    assert e["RUST_BACKTRACE"] == "1"
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["serviceAccountName"] == "outbox-operator-sa"
    bindings = [o for o in objects(full_render) if o["kind"] == "RoleBinding"]
    assert sorted((b["metadata"]["namespace"], b["metadata"]["name"]) for b in bindings) == [
        (NAMESPACE, "outbox-operator-full-leader-election"), ("shop", "outbox-operator-full")]
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "outbox-operator-sa", "namespace": NAMESPACE}]
               for b in bindings)
    lease_role = next(o for o in objects(full_render) if o["kind"] == "Role" and o["metadata"]["namespace"] == NAMESPACE)
    assert lease_role["rules"][1]["resourceNames"] == ["outbox-operator-lock"]
    assert by_kind(full_render, "Deployment")["metadata"]["name"] == "outbox-operator-full"
    assert by_kind(full_render, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    assert by_kind(full_render, "Service")["spec"]["ports"][0]["port"] == 9090


def leaves(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from leaves(v, prefix + (k,))
    else:
        yield prefix


def test_full_values_file_sets_every_value():
    with helm.Chart.load(CHART_DIR) as chart:
        defaults = chart.values
    full = full_values()
    missing = []
    for path in leaves(defaults):
        node = full
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(".".join(path))
                break
            node = node[key]
    assert missing == [], f"{FULL_VALUES.name} does not set {missing}"


def test_single_replica_has_no_pdb():
    rendered = render({"replicaCount": 1})
    assert by_kind(rendered, "PodDisruptionBudget") is None


def test_optional_objects_can_be_disabled():
    rendered = render(
        {
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "existing"},
            "metrics": {"service": {"enabled": False}},
            "podDisruptionBudget": {"enabled": False},
        }
    )
    assert sorted(o["kind"] for o in objects(rendered)) == ["Deployment"]
    assert by_kind(rendered, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"replicaCount": 0}, "/replicaCount"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "sha256:short"}}, "/image/digest"),
        ({"workerImage": {"pullPolicy": "Always"}}, "/workerImage/pullPolicy"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"leaderElection": {"leaseDurationSeconds": 1}}, "/leaderElection/leaseDurationSeconds"),
        ({"watchNamespace": "Not_A_Namespace"}, "/watchNamespace"),
        ({"resources": {"requests": {"cpu": "lots"}}}, "/resources/requests/cpu"),
        ({"metrics": {"serviceMonitor": {"enabled": True, "interval": "often"}}}, "/metrics/serviceMonitor/interval"),
        ({"serviceAccount": {"create": "yes"}}, "/serviceAccount/create"),
        ({"workerImageAllowlist": "registry.example.com/"}, "/workerImageAllowlist"),
        ({"workerImageAllowlist": ["registry.example.com/a/,registry.example.com/b/"]}, "/workerImageAllowlist/0"),
        ({"workerImageAllowlist": ["registry.example.com/ a/"]}, "/workerImageAllowlist/0"),
        ({"workerImageAllowlist": [""]}, "/workerImageAllowlist/0"),
        ({"workerImageAllowlist": ["a/", "a/"]}, "/workerImageAllowlist"),
    ],
)
def test_values_schema_refuses(change, message):
    with pytest.raises(helm.HelmError, match=message.replace("/", "/")):
        render(change)


def test_values_schema_accepts_defaults_and_full():
    with helm.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(chart.values)
        chart.validate_schema(chart.merge_values(copy.deepcopy(full_values())))


def test_notes_tell_what_to_do_next(default_render, full_render):
    notes = default_render["NOTES.txt"]
    assert "kubectl -n outbox-system rollout status deployment/outbox-operator" in notes
    assert "kubectl get outboxrelays" in notes
    assert "kind: OutboxRelay" in notes
    assert "all namespaces" in notes
    assert "namespace shop" in full_render["NOTES.txt"]
    # The OutboxRelay sample in NOTES is valid YAML of the right kind.
    sample = notes.split("cat <<'YAML' | kubectl apply -f -", 1)[1].split("   YAML", 1)[0]
    relay = yaml.safe_load("\n".join(line[3:] for line in sample.splitlines()))
    assert relay["kind"] == "OutboxRelay"
    # And so is the InboxRelay sample.
    assert "kubectl get inboxrelays" in notes
    sample = notes.split("cat <<'YAML' | kubectl apply -f -", 2)[2].split("   YAML", 1)[0]
    inbox = yaml.safe_load("\n".join(line[3:] for line in sample.splitlines()))
    assert inbox["kind"] == "InboxRelay"
    assert inbox["spec"]["database"]["urlSecretRef"] == relay["spec"]["database"]["urlSecretRef"]
    # Whether other worker images are allowed.
    assert "a spec.image naming another image is refused" in notes
    assert "spec.image may also start with registry.example.com/outbox/, ghcr.io/outbox-dev/outbox-worker:" in full_render["NOTES.txt"]


def test_notes_samples_match_the_crds(default_render, relay_schema, inbox_schema):
    """Both samples pass the CRD schemas as printed (placeholders included)."""
    import jsonschema

    samples = default_render["NOTES.txt"].split("cat <<'YAML' | kubectl apply -f -")[1:]
    assert len(samples) == 2
    for sample, schema in zip(samples, (relay_schema, inbox_schema)):
        obj = yaml.safe_load("\n".join(line[3:] for line in sample.split("   YAML", 1)[0].splitlines()))
        assert list(jsonschema.Draft7Validator(schema).iter_errors(obj)) == [], obj["kind"]


def render_with_chart_env(rendered, relay_path):
    """`outbox-operator render` with the chart's WORKER_IMAGE and IMAGE_ALLOWLIST (the two
    settings `run` shares with `render`)."""
    import os
    import subprocess

    from conftest import REPO_DIR, operator_command

    e = env(rendered)
    run_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_IMAGE", "IMAGE_ALLOWLIST")}
    run_env.update({k: e[k] for k in ("WORKER_IMAGE", "IMAGE_ALLOWLIST") if k in e})
    return subprocess.run(operator_command() + ["render", "-f", str(relay_path)], cwd=REPO_DIR, env=run_env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("example", ["outboxrelay.yaml", "inboxrelay.yaml"])
def test_the_operator_honours_the_charts_image_allowlist(tmp_path, default_render, full_render, example):
    relay = yaml.safe_load((CHART_DIR.parents[1] / "examples" / example).read_text())
    relay["spec"]["image"] = "registry.example.com/outbox/outbox-worker:custom"
    path = tmp_path / example
    path.write_text(yaml.safe_dump(relay))
    # Default values: no allowlist, so only the chart's worker image may be named.
    refused = render_with_chart_env(default_render, path)
    assert refused.returncode != 0 and "not allowed" in refused.stderr, refused.stderr
    # workerImageAllowlist of values-full.yaml allows registry.example.com/outbox/.
    allowed = render_with_chart_env(full_render, path)
    assert allowed.returncode == 0, allowed.stderr
    deployment = next(d for d in yaml.safe_load_all(allowed.stdout) if d and d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == relay["spec"]["image"]
    # The chart's own worker image is always allowed.
    relay["spec"]["image"] = env(default_render)["WORKER_IMAGE"]
    path.write_text(yaml.safe_dump(relay))
    assert render_with_chart_env(default_render, path).returncode == 0
