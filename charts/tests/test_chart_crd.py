"""The CRDs the chart installs are crds/outboxrelays.outbox.dev.yaml and
crds/inboxrelays.outbox.dev.yaml, byte for byte, and they are what the code generates
(`outbox-operator crd <plural>`)."""

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import CHART_DIR, CRD_FILE, INBOX_CRD_FILE, KUBERNETES_VERSIONS, run_operator

FIX = "run `make crds` (charts/outbox-operator/crds/ holds symlinks to crds/, keep them so)"
# plural -> the file in crds/
CRD_FILES = {"outboxrelays": CRD_FILE, "inboxrelays": INBOX_CRD_FILE}


def chart_crds():
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.crds


def test_chart_ships_exactly_the_crds_of_crds_dir():
    crds = {c["name"]: c["data"] for c in chart_crds()}
    assert sorted(crds) == sorted(f"crds/{f.name}" for f in CRD_FILES.values())
    for path in CRD_FILES.values():
        assert crds[f"crds/{path.name}"] == path.read_text(), FIX


@pytest.mark.parametrize("plural", CRD_FILES)
def test_chart_crd_is_a_symlink_to_crds_dir(plural):
    path = CRD_FILES[plural]
    link = CHART_DIR / "crds" / path.name
    assert link.is_symlink(), "keep the chart's CRDs symlinks so `make crds` updates both"
    assert link.resolve() == path.resolve()


@pytest.mark.parametrize("plural", CRD_FILES)
def test_crds_dir_equals_the_code(plural):
    assert CRD_FILES[plural].read_text() == run_operator("crd", plural).stdout, FIX


def test_crd_without_argument_prints_both():
    docs = [d for d in yaml.safe_load_all(run_operator("crd").stdout) if d]
    assert sorted(d["metadata"]["name"] for d in docs) == ["inboxrelays.outbox.dev", "outboxrelays.outbox.dev"]


def test_chart_has_no_crd_in_templates():
    # Helm installs crds/ before the templates and never upgrades or deletes it; a CRD in
    # templates/ would be deleted (with every relay) by `helm uninstall`.
    with helm.Chart.load(CHART_DIR) as chart:
        for template in chart.templates:
            assert "CustomResourceDefinition" not in template["data"], template["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_chart_crds_are_valid_customresourcedefinitions(version):
    for crd in chart_crds():
        kubernetes_validate.validate(yaml.safe_load(crd["data"]), version, strict=True)


def test_inboxrelay_crd_names_and_scale():
    """What kubectl and an HPA rely on: `kubectl get inboxrelays` / `ibr` / `outbox`, and the
    scale subresource (kubectl scale, HPA)."""
    crd = yaml.safe_load(INBOX_CRD_FILE.read_text())
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["plural"], names["kind"]) == ("outbox.dev", "inboxrelays", "InboxRelay")
    assert names["shortNames"] == ["ibr"] and "outbox" in names["categories"]
    assert crd["spec"]["scope"] == "Namespaced"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    assert version["served"] and version["storage"]
    assert set(version["subresources"]) == {"status", "scale"}
    outbox = yaml.safe_load(CRD_FILE.read_text())
    assert "outbox" in outbox["spec"]["names"]["categories"]
    assert "scale" in outbox["spec"]["versions"][0]["subresources"]
