"""Shared fixtures: how to call `outbox-operator` and where the samples are."""

import pathlib
import sys

import pytest
import yaml

OPERATOR_DIR = pathlib.Path(__file__).resolve().parents[2]
REPO_DIR = OPERATOR_DIR.parent
EXAMPLES = OPERATOR_DIR / "examples"
VALID_EXAMPLES = [
    "minimal.yaml",
    "full.yaml",
    "dev.yaml",
    "inbox/minimal.yaml",
    "inbox/full.yaml",
    "inbox/unordered.yaml",
]
# Oldest (k8s-openapi feature v1_33) and newest schemas this suite claims.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]

sys.path.insert(0, str(REPO_DIR / "scripts"))
from operator_cli import run_operator  # noqa: E402,F401  (used by the tests)


def invalid_examples(cel):
    paths = sorted(EXAMPLES.glob("invalid-*.yaml")) + sorted(EXAMPLES.glob("inbox/invalid-*.yaml"))
    return [
        str(p.relative_to(EXAMPLES)) for p in paths if p.name.startswith("invalid-cel-") == cel
    ]


def expected_field(path):
    for line in path.read_text().splitlines():
        if line.startswith("# expect-error:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path} lacks '# expect-error: FIELD'")


@pytest.fixture(scope="session")
def crds():
    """Both CRDs by kind, as `outbox-operator crd` prints them."""
    docs = [d for d in yaml.safe_load_all(run_operator("crd").stdout) if d is not None]
    return {d["spec"]["names"]["kind"]: d for d in docs}


@pytest.fixture(scope="session")
def crd(crds):
    return crds["OutboxRelay"]


@pytest.fixture(scope="session")
def relay_schema(crd):
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="session")
def schema_for(crds):
    """The openAPIV3Schema of the CRD of a sample's kind."""

    def pick(sample):
        kind = sample["kind"]
        return crds[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    return pick


def load_example(name):
    return yaml.safe_load((EXAMPLES / name).read_text())
