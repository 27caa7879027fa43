"""Shared helpers: the chart rendered with the real Helm engine (helm-python-sdk, Helm v4's Go
code behind a C ABI, no helm binary), the operator binary, and the repository paths."""

import logging
import pathlib
import re
import sys

import helm_python as helm
import pytest
import yaml

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parents[1]
CHART_DIR = REPO_DIR / "charts" / "outbox-operator"
CRD_FILE = REPO_DIR / "crds" / "outboxrelays.outbox.dev.yaml"
INBOX_CRD_FILE = REPO_DIR / "crds" / "inboxrelays.outbox.dev.yaml"
EXAMPLES_DIR = REPO_DIR / "examples"
FULL_VALUES = TESTS_DIR / "values-full.yaml"
RELEASE = "outbox-operator"
NAMESPACE = "outbox-system"
# Oldest (the operator's k8s-openapi feature v1_33, the chart's kubeVersion) and newest
# (the newest schemas kubernetes-validate ships) Kubernetes versions README.md claims.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]

sys.path.insert(0, str(REPO_DIR / "scripts"))
from operator_cli import operator_command, run_operator  # noqa: E402,F401  (used by the tests)

# The Go side logs an INFO line per symlink it follows (crds/ is a symlink): keep warnings only.
helm.enable_logging(logging.WARNING)


def cargo_version():
    text = (REPO_DIR / "Cargo.toml").read_text()
    match = re.search(r'^\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    assert match, "no [workspace.package] version in Cargo.toml"
    return match.group(1)


def load_docs(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


def full_values():
    return yaml.safe_load(FULL_VALUES.read_text())


def render(values=None, name=RELEASE, namespace=NAMESPACE):
    """{template path: [objects]} of the chart, NOTES.txt as raw text under 'NOTES.txt'."""
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name=name, namespace=namespace, is_install=True)
    out = {}
    for path, text in rendered.items():
        short = path.split("/templates/", 1)[-1]
        out[short] = text if short == "NOTES.txt" else load_docs(text)
    return out


def objects(rendered):
    return [o for path, docs in sorted(rendered.items()) if path != "NOTES.txt" for o in docs]


def by_kind(rendered, kind):
    found = [o for o in objects(rendered) if o["kind"] == kind]
    assert len(found) <= 1, f"more than one {kind}"
    return found[0] if found else None


@pytest.fixture(scope="session")
def default_render():
    return render()


@pytest.fixture(scope="session")
def full_render():
    return render(full_values())


@pytest.fixture(scope="session", params=["default", "full"])
def any_render(request, default_render, full_render):
    return {"default": default_render, "full": full_render}[request.param]


@pytest.fixture(scope="session")
def code_crds():
    """{kind: CustomResourceDefinition} of what `outbox-operator crd` prints (one YAML
    document per CRD)."""
    return {d["spec"]["names"]["kind"]: d for d in load_docs(run_operator("crd").stdout)}


@pytest.fixture(scope="session")
def code_crd(code_crds):
    return code_crds["OutboxRelay"]


@pytest.fixture(scope="session")
def relay_schema(code_crd):
    return code_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session")
def inbox_schema(code_crds):
    return code_crds["InboxRelay"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
