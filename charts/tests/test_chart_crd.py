"""The CRD the chart installs is crds/outboxrelays.outbox.dev.yaml, byte for byte, and that is
what the code generates (`outbox-operator crd`)."""

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import CHART_DIR, CRD_FILE, KUBERNETES_VERSIONS, run_operator

FIX = "run `make crds` (charts/outbox-operator/crds/ is a symlink to crds/, keep it one)"


def chart_crds():
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.crds


def test_chart_ships_exactly_the_crd_of_crds_dir():
    crds = chart_crds()
    assert [c["name"] for c in crds] == ["crds/outboxrelays.outbox.dev.yaml"]
    assert crds[0]["data"] == CRD_FILE.read_text(), FIX


def test_chart_crd_is_a_symlink_to_crds_dir():
    link = CHART_DIR / "crds" / CRD_FILE.name
    assert link.is_symlink(), "keep the chart's CRD a symlink so `make crds` updates both"
    assert link.resolve() == CRD_FILE.resolve()


def test_crds_dir_equals_the_code():
    assert CRD_FILE.read_text() == run_operator("crd").stdout, FIX


def test_chart_has_no_crd_in_templates():
    # Helm installs crds/ before the templates and never upgrades or deletes it; a CRD in
    # templates/ would be deleted (with every OutboxRelay) by `helm uninstall`.
    with helm.Chart.load(CHART_DIR) as chart:
        for template in chart.templates:
            assert "CustomResourceDefinition" not in template["data"], template["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_chart_crd_is_a_valid_customresourcedefinition(version):
    crd = yaml.safe_load(chart_crds()[0]["data"])
    kubernetes_validate.validate(crd, version, strict=True)
