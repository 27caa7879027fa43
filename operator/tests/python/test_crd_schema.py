"""Sample OutboxRelays against the CRD's openAPIV3Schema (jsonschema).

jsonschema checks the structural part (types, required, patterns, ranges). The CEL
`x-kubernetes-validations` rules cannot be evaluated offline: the `invalid-cel-*` samples
pass this schema check and are refused by `outbox-operator render`, whose validation
implements the same rules (and is what reconcile reports as InvalidSpec)."""

import jsonschema
import pytest

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
def test_valid_samples_pass(relay_schema, name):
    assert errors(relay_schema, load_example(name)) == []


@pytest.mark.parametrize("name", invalid_examples(cel=False))
def test_invalid_samples_fail_naming_the_field(relay_schema, name):
    field = expected_field(EXAMPLES / name)
    found = errors(relay_schema, load_example(name))
    assert found, f"{name} passed the CRD schema"
    assert any(field in e for e in found), f"{name}: {found} does not name {field}"


@pytest.mark.parametrize("name", invalid_examples(cel=True))
def test_cel_only_samples_pass_the_structural_schema(relay_schema, name):
    # Only CEL (server-side) refuses these; see the render test below.
    assert errors(relay_schema, load_example(name)) == []


@pytest.mark.parametrize("name", invalid_examples(cel=False) + invalid_examples(cel=True))
def test_render_refuses_invalid_samples_naming_the_field(name):
    result = run_operator("render", "-f", str(EXAMPLES / name), check=False)
    assert result.returncode != 0, f"render accepted {name}"
    field = expected_field(EXAMPLES / name)
    assert field in result.stderr, result.stderr
    assert result.stdout == ""


def test_printer_columns(crd):
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"].upper() for c in columns] == ["TOPIC", "REPLICAS", "READY", "LEADER", "AGE"]


def test_cel_rules_present(relay_schema):
    spec = relay_schema["properties"]["spec"]["properties"]
    assert spec["pubsub"]["properties"]["topic"]["x-kubernetes-validations"]
    assert spec["leaderElection"]["x-kubernetes-validations"]
    assert relay_schema["x-kubernetes-validations"]
