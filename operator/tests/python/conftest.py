"""Shared fixtures: how to call `outbox-operator` and where the samples are."""

import pathlib
import sys

import pytest
import yaml

OPERATOR_DIR = pathlib.Path(__file__).resolve().parents[2]
REPO_DIR = OPERATOR_DIR.parent
EXAMPLES = OPERATOR_DIR / "examples"
VALID_EXAMPLES = ["minimal.yaml", "full.yaml", "dev.yaml"]
# Oldest (k8s-openapi feature v1_33) and newest schemas this suite claims.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]

sys.path.insert(0, str(REPO_DIR / "scripts"))
from operator_cli import run_operator  # noqa: E402,F401  (used by the tests)


def invalid_examples(cel):
    names = sorted(p.name for p in EXAMPLES.glob("invalid-*.yaml"))
    return [n for n in names if n.startswith("invalid-cel-") == cel]


def expected_field(path):
    for line in path.read_text().splitlines():
        if line.startswith("# expect-error:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path} lacks '# expect-error: FIELD'")


@pytest.fixture(scope="session")
def crd():
    return yaml.safe_load(run_operator("crd").stdout)


@pytest.fixture(scope="session")
def relay_schema(crd):
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def load_example(name):
    return yaml.safe_load((EXAMPLES / name).read_text())
