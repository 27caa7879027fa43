"""Every object `outbox-operator render` produces is valid against the official
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors)."""

import kubernetes_validate
import pytest
import yaml

from conftest import EXAMPLES, KUBERNETES_VERSIONS, VALID_EXAMPLES, run_operator

EXPECTED_KINDS = {
    "minimal.yaml": ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"],
    "full.yaml": ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"],
    "dev.yaml": ["ServiceAccount", "Role", "RoleBinding", "Deployment"],
    "inbox/minimal.yaml": ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"],
    "inbox/full.yaml": ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"],
    "inbox/unordered.yaml": ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"],
}


def render(name):
    # The examples name images of these registries in spec.image.
    out = run_operator(
        "render",
        "-f",
        str(EXAMPLES / name),
        "--image-allowlist",
        "registry.example.com/,ghcr.io/outbox-dev/",
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


@pytest.mark.parametrize("name", VALID_EXAMPLES)
def test_render_kinds(name):
    assert [o["kind"] for o in render(name)] == EXPECTED_KINDS[name]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", VALID_EXAMPLES)
def test_rendered_objects_match_kubernetes_schemas(name, version):
    for obj in render(name):
        # Raises ValidationError with the offending path on failure.
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", VALID_EXAMPLES)
def test_pod_hardening(name):
    deployment = next(o for o in render(name) if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", ["OutboxRelay", "InboxRelay"])
def test_crd_is_a_valid_customresourcedefinition(crds, kind, version):
    kubernetes_validate.validate(crds[kind], version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_operator_install_manifest(version):
    path = EXAMPLES.parent / "deploy" / "operator.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert [d["kind"] for d in docs] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
    ]
    for obj in docs:
        kubernetes_validate.validate(obj, version, strict=True)
