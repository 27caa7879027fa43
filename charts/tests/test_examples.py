"""examples/: the quickstart relay and inbox against their CRD schemas (jsonschema) and the
operator's own validation; the development dependencies against the official Kubernetes
schemas; and the names that tie them together (Secret, Services, topic, subscriptions, tables,
images, the labels scripts/e2e.sh selects pods by) agree."""

import base64
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (
    EXAMPLES_DIR,
    INBOX_CRD_FILE,
    KUBERNETES_VERSIONS,
    REPO_DIR,
    cargo_version,
    load_docs,
    run_operator,
)

RELAY_FILE = EXAMPLES_DIR / "outboxrelay.yaml"
INBOX_FILE = EXAMPLES_DIR / "inboxrelay.yaml"
WORKER_FILES = [RELAY_FILE, INBOX_FILE]
DEV_DIR = EXAMPLES_DIR / "dev"
DEV_NAMESPACE = "outbox-dev"


def dev_objects():
    out = []
    for path in sorted(DEV_DIR.glob("*.yaml")):
        out.extend(load_docs(path.read_text()))
    return out


def find(kind, name):
    matches = [o for o in dev_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"examples/dev/ must hold exactly one {kind} {name}"
    return matches[0]


@pytest.fixture(scope="module")
def relay():
    return yaml.safe_load(RELAY_FILE.read_text())


@pytest.fixture(scope="module")
def inbox():
    return yaml.safe_load(INBOX_FILE.read_text())


def rendered(path):
    return load_docs(run_operator("render", "-f", str(path)).stdout)


def e2e_script():
    return (REPO_DIR / "scripts" / "e2e.sh").read_text()


def e2e_assignment(name):
    """The value of `name=...` at the start of a line of scripts/e2e.sh (quotes dropped)."""
    values = [line.split("=", 1)[1].split(" #", 1)[0].strip().strip('"')
              for line in e2e_script().splitlines() if line.startswith(f"{name}=")]
    assert len(values) == 1, f"scripts/e2e.sh must set {name} once"
    return values[0]


def test_relay_matches_the_crd_schema(relay, relay_schema):
    errors = [
        ".".join(map(str, e.absolute_path)) + ": " + e.message
        for e in jsonschema.Draft7Validator(relay_schema).iter_errors(relay)
    ]
    assert errors == []


def test_relay_passes_the_operators_validation_and_renders_valid_objects(relay):
    # `render` runs the same checks as reconcile (including the CEL rules' Rust mirror).
    out = run_operator("render", "-f", str(RELAY_FILE)).stdout
    docs = load_docs(out)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"]
    for version in KUBERNETES_VERSIONS:
        for obj in docs:
            kubernetes_validate.validate(obj, version, strict=True)


def test_relay_has_two_replicas_for_failover(relay):
    assert relay["spec"]["replicas"] == 2
    assert relay["metadata"]["namespace"] == DEV_NAMESPACE


def test_inbox_crd_is_in_crds_dir():
    assert INBOX_CRD_FILE.exists(), "crds/ lacks the InboxRelay CRD (run `make crds`)"
    crd = yaml.safe_load(INBOX_CRD_FILE.read_text())
    assert crd["spec"]["names"]["kind"] == "InboxRelay"


def test_inbox_matches_the_crd_schema_of_crds_dir(inbox):
    crd = yaml.safe_load(INBOX_CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == inbox["apiVersion"].split("/")[1]]
    errors = [
        ".".join(map(str, e.absolute_path)) + ": " + e.message
        for e in jsonschema.Draft7Validator(version["schema"]["openAPIV3Schema"]).iter_errors(inbox)
    ]
    assert errors == []


def test_inbox_matches_the_code_schema(inbox, inbox_schema):
    assert list(jsonschema.Draft7Validator(inbox_schema).iter_errors(inbox)) == []


def test_inbox_passes_the_operators_validation_and_renders_valid_objects(inbox):
    docs = rendered(INBOX_FILE)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Deployment", "PodDisruptionBudget"]
    # Named <name>-inbox: an OutboxRelay and an InboxRelay of one name (both `orders` here)
    # never share an object.
    assert {d["metadata"]["name"] for d in docs} == {inbox["metadata"]["name"] + "-inbox"}
    relay_names = {d["metadata"]["name"] for d in rendered(RELAY_FILE)}
    assert not relay_names & {d["metadata"]["name"] for d in docs}
    for version in KUBERNETES_VERSIONS:
        for obj in docs:
            kubernetes_validate.validate(obj, version, strict=True)


def test_inbox_has_one_consumer_and_a_standby(inbox):
    # The subscription orders messages: only one consumer keeps the per-key order.
    assert inbox["spec"]["replicas"] == 2
    assert inbox["spec"]["leaderElection"]["enabled"] is True
    assert inbox["metadata"]["namespace"] == DEV_NAMESPACE


def test_e2e_names_and_selectors_match_what_the_operator_creates(relay, inbox):
    """scripts/e2e.sh finds the pods, Deployment and Lease of each by these."""
    assert e2e_assignment("relay") == relay["metadata"]["name"]
    assert e2e_assignment("inbox") == inbox["metadata"]["name"]
    for path, selector_var, name in ((RELAY_FILE, "relay_pods", "$relay"), (INBOX_FILE, "inbox_pods", "$inbox")):
        deployment = next(d for d in rendered(path) if d["kind"] == "Deployment")
        selector = e2e_assignment(selector_var).replace(name, yaml.safe_load(path.read_text())["metadata"]["name"])
        assert dict(kv.split("=", 1) for kv in selector.split(",")) == deployment["spec"]["selector"]["matchLabels"]
    inbox_deployment = next(d for d in rendered(INBOX_FILE) if d["kind"] == "Deployment")
    assert e2e_assignment("inbox_objects").replace("$inbox", inbox["metadata"]["name"]) == inbox_deployment["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_dev_objects_match_official_schemas(version):
    objs = dev_objects()
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


def test_dev_objects_live_in_the_dev_namespace():
    objs = dev_objects()
    namespaces = [o for o in objs if o["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [DEV_NAMESPACE]
    # `kubectl apply -f examples/dev/` applies files in name order: the Namespace first.
    assert sorted(DEV_DIR.glob("*.yaml"))[0].name == "00-namespace.yaml"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == DEV_NAMESPACE, obj["metadata"]["name"]


@pytest.mark.parametrize("path", WORKER_FILES, ids=lambda p: p.name)
def test_worker_secret_exists_with_the_key(path):
    ref = yaml.safe_load(path.read_text())["spec"]["database"]["urlSecretRef"]
    secret = find("Secret", ref["name"])
    data = dict(secret.get("stringData", {}))
    data.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    url = data[ref["key"]]
    match = re.fullmatch(r"postgres://(\w+):(\w+)@([\w.-]+):(\d+)/(\w+)(\?.*)?", url)
    assert match, url
    user, password, host, port, database, _ = match.groups()
    service = find("Service", host.split(".")[0])
    assert host in (service["metadata"]["name"], f"{service['metadata']['name']}.{DEV_NAMESPACE}.svc")
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    env = {e["name"]: e for e in find("Deployment", "postgres")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_USER"]["value"] == user
    assert env["POSTGRES_DB"]["value"] == database
    pw_ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert pw_ref["name"] == ref["name"] and data[pw_ref["key"]] == password


@pytest.mark.parametrize("path", WORKER_FILES, ids=lambda p: p.name)
def test_worker_emulator_host_is_the_emulator_service(path):
    host, port = yaml.safe_load(path.read_text())["spec"]["pubsub"]["emulatorHost"].rsplit(":", 1)
    service = find("Service", "pubsub-emulator")
    assert host == f"pubsub-emulator.{DEV_NAMESPACE}.svc"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    container = find("Deployment", "pubsub-emulator")["spec"]["template"]["spec"]["containers"][0]
    assert f"--host-port=0.0.0.0:{port}" in container["command"]


def test_setup_job_creates_the_relays_topic_and_a_subscription(relay):
    container = find("Job", "pubsub-setup")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert relay["spec"]["pubsub"]["topic"] == f"projects/{env['PROJECT']}/topics/{env['TOPIC']}"
    assert env["EMULATOR"] == f"http://{relay['spec']['pubsub']['emulatorHost']}"
    emulator = find("Deployment", "pubsub-emulator")["spec"]["template"]["spec"]["containers"][0]
    assert f"--project={env['PROJECT']}" in emulator["command"]
    # scripts/e2e.sh reads this subscription.
    e2e = e2e_script()
    assert f"subscription={env['SUBSCRIPTION']}\n" in e2e
    assert f"project={env['PROJECT']}\n" in e2e
    assert f"ns={DEV_NAMESPACE}\n" in e2e
    assert f"relay={relay['metadata']['name']}\n" in e2e


def test_setup_job_creates_the_inbox_subscription_on_the_relays_topic(relay, inbox):
    container = find("Job", "pubsub-setup")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert inbox["spec"]["pubsub"]["subscription"] == f"projects/{env['PROJECT']}/subscriptions/{env['INBOX_SUBSCRIPTION']}"
    # Its own subscription: sharing scripts/e2e.sh's would split the messages between them.
    assert env["INBOX_SUBSCRIPTION"] != env["SUBSCRIPTION"]
    script = container["args"][0]
    assert 'for sub in "$SUBSCRIPTION" "$INBOX_SUBSCRIPTION"; do' in script
    # Both on the relay's topic, with message ordering (test_e2e_helpers.py runs the script).
    assert '\\"topic\\": \\"projects/$PROJECT/topics/$TOPIC\\", \\"enableMessageOrdering\\": true' in script


def test_inbox_table_is_the_one_the_migrations_create(inbox):
    migrations = "".join(p.read_text() for p in sorted((REPO_DIR / "migrations").glob("*.sql")))
    assert f"CREATE TABLE IF NOT EXISTS {inbox['spec']['database']['table']} (" in migrations


def test_migrate_job_uses_the_worker_image_make_images_builds(relay):
    pod = find("Job", "outbox-migrate")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == f"ghcr.io/outbox-dev/outbox-worker:{cargo_version()}"
    assert container["command"] == ["outbox-worker"] and container["args"] == ["migrate"]
    ref = relay["spec"]["database"]["urlSecretRef"]
    (url_env,) = [e for e in container["env"] if e["name"] == "DATABASE_URL"]
    assert url_env["valueFrom"]["secretKeyRef"] == {"name": ref["name"], "key": ref["key"]}
    assert pod["securityContext"]["runAsUser"] == 65532  # distroless nonroot


def test_relay_table_is_the_one_the_migrations_create(relay):
    migrations = "".join(p.read_text() for p in sorted((REPO_DIR / "migrations").glob("*.sql")))
    assert f"CREATE TABLE IF NOT EXISTS {relay['spec']['database']['table']} (" in migrations


def test_no_example_uses_a_latest_tag():
    for obj in dev_objects():
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            assert ":" in c["image"].rsplit("/", 1)[-1], c["image"]
            assert not c["image"].endswith(":latest"), c["image"]


def restricted_violations(pod_spec):
    """The Pod Security Standard `restricted` (v1.33+) checks that apply to these pods."""
    bad = []
    pod_sc = pod_spec.get("securityContext", {})
    for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{name}: capabilities must drop ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
    for v in pod_spec.get("volumes", []):
        allowed = {"name", "emptyDir", "secret", "configMap", "projected", "downwardAPI",
                   "persistentVolumeClaim", "ephemeral", "csi"}
        if set(v) - allowed:
            bad.append(f"volume {v['name']}: type not allowed")
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        bad.append("host namespaces")
    return bad


# The emulator image runs as root: the dev namespace enforces `baseline` for it alone.
NOT_RESTRICTED = {("Deployment", "pubsub-emulator")}


def test_dev_pods_meet_pod_security_restricted_but_the_emulator():
    for obj in dev_objects():
        if obj["kind"] in ("Deployment", "Job") and (obj["kind"], obj["metadata"]["name"]) not in NOT_RESTRICTED:
            assert restricted_violations(obj["spec"]["template"]["spec"]) == [], obj["metadata"]["name"]
    # The checker is not vacuous: it flags the emulator.
    assert restricted_violations(find("Deployment", "pubsub-emulator")["spec"]["template"]["spec"])
    ns = next(o for o in dev_objects() if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"


def test_relay_inbox_and_operator_pods_meet_pod_security_restricted(default_render, full_render):
    for path in WORKER_FILES:
        deployment = next(d for d in rendered(path) if d["kind"] == "Deployment")
        assert restricted_violations(deployment["spec"]["template"]["spec"]) == [], path.name
    for chart in (default_render, full_render):
        (operator,) = [o for docs in chart.values() if isinstance(docs, list) for o in docs if o["kind"] == "Deployment"]
        assert restricted_violations(operator["spec"]["template"]["spec"]) == []
