"""The chart's RBAC: no wildcards, and exactly the API calls the operator makes.

The calls are learned from the code by running the real `outbox-operator`, with the args
and environment of the chart's Deployment, against fake_apiserver.py (leader election with
the chart's Lease; OutboxRelays: a normal one, a single-replica one whose stale
PodDisruptionBudget must be deleted, and one whose Secret is missing, which publishes and
then re-publishes a Warning Event; an InboxRelay; and a relay in another namespace).

Twice: with the default values (a ClusterRole), and with `watchNamespace` (a Role in that
namespace, and a Role for the operator's own Lease in the release namespace). Every recorded
call (group, resource, verb, namespace, name) must be granted by the chart's RBAC bound to the
operator's ServiceAccount; every grant must be either used by a recorded call or one of the
few justified below, each with its own check.
"""

import base64
import os
import pathlib
import signal
import subprocess
import time

import pytest
import yaml

from conftest import EXAMPLES_DIR, REPO_DIR, by_kind, objects, operator_command, render, run_operator
from fake_apiserver import FakeApiServer

SHOP = "shop"
ELSEWHERE = "elsewhere"
OPERATOR_NS = "outbox-system"
WILDCARD_FIELDS = ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
RELAY_KINDS = {"outboxrelays": "OutboxRelay", "inboxrelays": "InboxRelay"}
VARIANTS = {
    "all-namespaces": {},
    "watch-namespace": {"watchNamespace": SHOP},
}


def relay(name, replicas, secret, namespace=SHOP):
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "OutboxRelay",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {
            "replicas": replicas,
            "database": {"urlSecretRef": {"name": secret, "key": "url"}, "table": "outbox"},
            "pubsub": {"topic": f"projects/acme-shop-prod/topics/{name}"},
        },
    }


def inbox(name, replicas, secret, namespace=SHOP):
    return {
        "apiVersion": "outbox.dev/v1alpha1",
        "kind": "InboxRelay",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {
            "replicas": replicas,
            "database": {"urlSecretRef": {"name": secret, "key": "url"}, "table": "inbox"},
            "pubsub": {"subscription": f"projects/acme-shop-prod/subscriptions/{name}"},
        },
    }


def secret(name, namespace):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {"url": base64.b64encode(b"postgres://u:p@db/shop").decode()}}


# -- the chart's RBAC, as data -----------------------------------------------------------------
def grants(rendered):
    """[(namespace, rule)] of every rule bound to the operator's ServiceAccount; namespace None
    for a ClusterRole bound by a ClusterRoleBinding. Asserts that every role is bound to it
    and every binding refers to a role of the chart."""
    objs = [o for o in objects(rendered) if o["kind"] in RBAC_KINDS]
    sa = by_kind(rendered, "ServiceAccount")
    subject = [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}]
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("ClusterRole", "Role")}
    bound, out = set(), []
    for b in (o for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        assert b["subjects"] == subject, b
        ref = b["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        namespace = b["metadata"].get("namespace")  # None for a ClusterRoleBinding
        key = (ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"])
        assert key in roles, f"{b['kind']} {b['metadata']['name']} refers to {key}, which the chart lacks"
        bound.add(key)
        out.extend((namespace, rule) for rule in roles[key]["rules"])
    assert bound == set(roles), f"roles bound to nothing: {set(roles) - bound}"
    return out


def expand(grant_list):
    """{(namespace, group, resource, verb, resourceName)} (None: any namespace / any name)."""
    out = set()
    for namespace, rule in grant_list:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        out.add((namespace, group, resource, verb, name))
    return out


def allows(grant, call):
    g_ns, g_group, g_resource, g_verb, g_name = grant
    ns, group, resource, verb, name = call
    return ((g_ns is None or g_ns == ns) and (g_group, g_resource, g_verb) == (group, resource, verb)
            and (g_name is None or g_name == name))


def short(calls):
    return {(g, r, v) for (_, g, r, v, _) in calls}


# -- the recorded run --------------------------------------------------------------------------
def chart_env_and_args(rendered):
    """The operator container's environment and args as the chart renders them, with the
    downward-API fields filled in as the kubelet would."""
    container = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    fields = {"metadata.name": "outbox-operator-0", "metadata.namespace": OPERATOR_NS}
    env = {}
    for e in container["env"]:
        env[e["name"]] = e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env, container["args"]


def record(tmp_path_factory, rendered):
    """Runs `outbox-operator run` with the chart's environment and args against the fake API
    server; returns ({(namespace, group, resource, verb, name)} of every call, the log, the
    namespaces the operator should reconcile)."""
    chart_env, args = chart_env_and_args(rendered)
    watched = {chart_env["WATCH_NAMESPACE"]} if chart_env.get("WATCH_NAMESPACE") else {SHOP, ELSEWHERE}
    seed = [
        secret("orders-db", SHOP),
        relay("orders", 2, "orders-db"),
        relay("single", 1, "orders-db"),
        relay("blocked", 2, "missing-secret"),
        inbox("orders", 2, "orders-db"),
        secret("other-db", ELSEWHERE),
        relay("other", 2, "other-db", ELSEWHERE),
        inbox("other", 1, "other-db", ELSEWHERE),
    ]
    with FakeApiServer(seed) as api:
        # A PDB left over from when `single` had 2 replicas: the operator must delete it.
        uid = api.objects[("outbox.dev", "outboxrelays", SHOP, "single")]["metadata"]["uid"]
        api.put({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                 "metadata": {"name": "single", "namespace": SHOP, "ownerReferences": [
                     {"apiVersion": "outbox.dev/v1alpha1", "kind": "OutboxRelay", "name": "single",
                      "uid": uid, "controller": True}]},
                 "spec": {"minAvailable": 1}})
        kubeconfig = tmp_path_factory.mktemp("kube") / "config"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": OPERATOR_NS}}],
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "RUST_LOG"))}
        env.update(chart_env)
        # Not in a pod: a free port, and a short Lease so that the run is quick.
        env.update({"KUBECONFIG": str(kubeconfig), "HEALTH_ADDR": "127.0.0.1:0", "LEASE_DURATION_SECONDS": "3"})
        log = tmp_path_factory.mktemp("log") / "operator.log"

        def relay_statuses():
            return {(r, o["metadata"]["namespace"], o["metadata"]["name"]): o.get("status")
                    for r in RELAY_KINDS for o in api.where("outbox.dev", r)}

        with open(log, "w") as out:
            proc = subprocess.Popen(operator_command() + args, cwd=REPO_DIR, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            # Until every watched relay has a status, the stale PDB is gone and the blocked
            # relay's Event was re-published (its 15 s requeue), or 60 s.
            deadline = time.monotonic() + 60
            lease_key = ("coordination.k8s.io", "leases", OPERATOR_NS, chart_env["LEASE_NAME"])
            holders = set()
            while time.monotonic() < deadline and proc.poll() is None:
                with api.lock:
                    holders.add(api.objects.get(lease_key, {}).get("spec", {}).get("holderIdentity"))
                    statuses = [s for (_, ns, _), s in relay_statuses().items() if ns in watched]
                    pdb_gone = ("policy", "poddisruptionbudgets", SHOP, "single") not in api.objects
                if all(statuses) and pdb_gone and ("events.k8s.io", "events", "patch") in api.verbs_seen():
                    break
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        text = log.read_text()
        if "CryptoProvider" in text:
            pytest.fail(
                "outbox-operator panicked at startup: no rustls CryptoProvider. Built alone "
                "(`cargo build -p operator`) kube's `rustls-tls` selects no provider; add the "
                "`aws-lc-rs` feature to kube in operator/Cargo.toml (the worker's provider)."
            )
        with api.lock:
            statuses = relay_statuses()
            calls = {(ns, g, r, v, name) for (_, g, r, v, ns, name) in api.calls}
        missing = {k: s for k, s in statuses.items() if k[1] in watched and not s}
        assert not missing, f"not every relay was reconciled: {sorted(missing)}\n{text[-4000:]}"
        untouched = {k: s for k, s in statuses.items() if k[1] not in watched and s}
        assert not untouched, f"relays outside watchNamespace were reconciled: {sorted(untouched)}"
        # It led with the chart's Lease name and identity.
        assert chart_env["POD_NAME"] in holders, (holders, sorted(api.objects))
        return calls, text, watched


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(rendered chart, recorded calls, operator log, watched namespaces) per variant."""
    rendered = render(VARIANTS[request.param])
    calls, log, watched = record(tmp_path_factory, rendered)
    return rendered, calls, log, watched


def test_the_scenario_ran(variant):
    _, calls, log, watched = variant
    seen = short(calls)
    assert ("coordination.k8s.io", "leases", "create") in seen, log[-3000:]  # leader election
    assert ("policy", "poddisruptionbudgets", "delete") in seen, log[-3000:]
    assert ("events.k8s.io", "events", "create") in seen, log[-3000:]
    assert ("outbox.dev", "outboxrelays/status", "patch") in seen, log[-3000:]
    assert ("outbox.dev", "inboxrelays/status", "patch") in seen, log[-3000:]
    # The ownership check reads every owned kind by name before applying it.
    for resource in ("serviceaccounts", "roles", "rolebindings", "deployments"):
        assert any(r == resource and v == "get" for (_, r, v) in seen), (resource, log[-3000:])
    # Calls go to the watched namespaces and to the Lease in the operator's own; cluster-wide
    # (namespace None: the list/watch of all namespaces) only without watchNamespace.
    cluster_wide = {None} if watched == {SHOP, ELSEWHERE} else set()
    assert {ns for (ns, *_) in calls} <= watched | {OPERATOR_NS} | cluster_wide
    assert {v for (ns, _, _, v, _) in calls if ns is None} <= {"list", "watch"}


def test_every_call_the_operator_makes_is_granted(variant):
    rendered, calls, _, _ = variant
    have = expand(grants(rendered))
    missing = sorted((c for c in calls if not any(allows(g, c) for g in have)), key=str)
    assert missing == [], f"the chart's RBAC lacks (namespace, group, resource, verb, name) {missing}"


def worker_role_rules(example):
    out = run_operator("render", "-f", str(EXAMPLES_DIR / example)).stdout
    role = next(d for d in yaml.safe_load_all(out) if d and d["kind"] == "Role")
    return role["rules"]


WORKER_EXAMPLES = ["outboxrelay.yaml", "inboxrelay.yaml"]


@pytest.mark.parametrize("values", list(VARIANTS.values()), ids=list(VARIANTS))
@pytest.mark.parametrize("example", WORKER_EXAMPLES)
def test_operator_holds_what_the_worker_roles_grant(values, example):
    """RBAC escalation prevention: the operator may only create Roles granting what it holds
    itself in the Role's namespace (it has no `escalate`/`bind`)."""
    have = expand(grants(render(values)))
    for rule in worker_role_rules(example):
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        # Any name: what the operator holds must not depend on the relay's name.
                        call = (SHOP, group, resource, verb, name)
                        assert any(allows(g, call) and g[4] is None for g in have), \
                            f"cannot grant {group}/{resource} {verb} in {SHOP}"
    assert not any(v in ("escalate", "bind", "impersonate") for (_, _, _, v, _) in have)


def owner_references_block_deletion():
    refs = []
    for example in WORKER_EXAMPLES:
        out = run_operator("render", "-f", str(EXAMPLES_DIR / example)).stdout
        refs += [r for d in yaml.safe_load_all(out) if d for r in d["metadata"].get("ownerReferences", [])]
    return bool(refs) and all(r.get("blockOwnerDeletion") for r in refs)


def kube_runtime_patches_event_series():
    """kube-runtime's Recorder patches an Event when it repeats (a series)."""
    home = pathlib.Path(os.environ.get("CARGO_HOME", pathlib.Path.home() / ".cargo"))
    sources = sorted(home.glob("registry/src/*/kube-runtime-*/src/events.rs"))
    return not sources or any("Patch::Merge(&event)" in s.read_text() for s in sources)


def worker_roles_grant(verb):
    return all(any(verb in r["verbs"] and "leases" in r["resources"] for r in worker_role_rules(e))
               for e in WORKER_EXAMPLES)


# Granted without being seen in the fake-API run, each for a reason checked here
# ((group, resource, verb), in the relays' namespaces).
JUSTIFIED = {
    # The workers' Roles grant these on their Lease (RBAC escalation prevention: the operator
    # must hold them in the relays' namespaces; its own Lease uses create and patch, but with
    # watchNamespace that Lease is in another namespace).
    ("coordination.k8s.io", "leases", "update"): lambda: worker_roles_grant("update"),
    ("coordination.k8s.io", "leases", "create"): lambda: worker_roles_grant("create"),
    ("coordination.k8s.io", "leases", "patch"): lambda: worker_roles_grant("patch"),
    # blockOwnerDeletion on owned objects needs update on the owner's finalizers where the
    # OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift, some others).
    ("outbox.dev", "outboxrelays/finalizers", "update"): owner_references_block_deletion,
    ("outbox.dev", "inboxrelays/finalizers", "update"): owner_references_block_deletion,
    # Repeated Events are patched (series); seen in the run too unless it was cut short.
    ("events.k8s.io", "events", "patch"): kube_runtime_patches_event_series,
}


def test_nothing_is_granted_that_the_operator_does_not_use(variant):
    rendered, calls, _, _ = variant
    unused = [g for g in expand(grants(rendered)) if not any(allows(g, c) for c in calls)]
    unjustified = sorted((g for g in unused if g[1:4] not in JUSTIFIED or g[0] == OPERATOR_NS), key=str)
    assert unjustified == [], f"the chart grants {unjustified}, which the operator never uses"
    for grant in {g[1:4] for g in unused}:
        assert JUSTIFIED[grant](), f"the justification of {grant} no longer holds"


def test_secrets_are_only_read_by_name(variant):
    _, calls, _, _ = variant
    assert {v for (_, g, r, v, _) in calls if (g, r) == ("", "secrets")} == {"get"}


# -- the RBAC objects themselves -----------------------------------------------------------------
def rbac_objects(rendered):
    return [o for o in objects(rendered) if o["kind"] in RBAC_KINDS]


@pytest.mark.parametrize("values", list(VARIANTS.values()) + [{"watchNamespace": OPERATOR_NS}],
                         ids=list(VARIANTS) + ["watch-release-namespace"])
def test_no_wildcards(values):
    for rendered in (render(values), render({**values, "leaderElection": {"enabled": False}})):
        roles = [o for o in rbac_objects(rendered) if o["kind"] in ("ClusterRole", "Role")]
        assert roles
        for role in roles:
            assert "aggregationRule" not in role
            for rule in role["rules"]:
                for field in WILDCARD_FIELDS:
                    assert not any("*" in v for v in rule.get(field, [])), rule


def test_all_namespaces_only_a_clusterrole_and_its_binding_grant_anything(default_render):
    assert sorted(o["kind"] for o in rbac_objects(default_render)) == ["ClusterRole", "ClusterRoleBinding"]
    binding = by_kind(default_render, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": by_kind(default_render, "ClusterRole")["metadata"]["name"]}
    grants(default_render)  # bound to the operator's ServiceAccount


def test_watch_namespace_grants_nothing_cluster_wide():
    rendered = render(VARIANTS["watch-namespace"])
    found = sorted((o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in rbac_objects(rendered))
    assert found == [
        ("Role", OPERATOR_NS, "outbox-operator-leader-election"),
        ("Role", SHOP, "outbox-operator"),
        ("RoleBinding", OPERATOR_NS, "outbox-operator-leader-election"),
        ("RoleBinding", SHOP, "outbox-operator"),
    ]
    (lease_role,) = [o for o in rbac_objects(rendered) if o["kind"] == "Role" and o["metadata"]["namespace"] == OPERATOR_NS]
    # Only the operator's Lease in its own namespace; create cannot be limited by name.
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["outbox-operator"],
         "verbs": ["get", "patch"]},
    ]
    # The Role in the watched namespace grants what the ClusterRole grants everywhere else.
    (watch_role,) = [o for o in rbac_objects(rendered) if o["kind"] == "Role" and o["metadata"]["namespace"] == SHOP]
    assert watch_role["rules"] == by_kind(render(), "ClusterRole")["rules"]
    grants(rendered)  # every Role bound to the operator's ServiceAccount


def test_watch_namespace_lease_role_follows_the_lease_values():
    rendered = render({"watchNamespace": SHOP, "leaderElection": {"leaseName": "my-lock"}})
    roles = [o for o in rbac_objects(rendered) if o["kind"] == "Role" and o["metadata"]["namespace"] == OPERATOR_NS]
    assert roles[0]["rules"][1]["resourceNames"] == ["my-lock"]
    # Without leader election the operator has no Lease and needs nothing in its namespace.
    rendered = render({"watchNamespace": SHOP, "leaderElection": {"enabled": False}})
    assert {o["metadata"]["namespace"] for o in rbac_objects(rendered)} == {SHOP}


def test_watch_namespace_may_be_the_release_namespace():
    rendered = render({"watchNamespace": OPERATOR_NS})
    names = sorted(o["metadata"]["name"] for o in rbac_objects(rendered) if o["kind"] == "Role")
    assert names == ["outbox-operator", "outbox-operator-leader-election"]
    assert {o["metadata"]["namespace"] for o in rbac_objects(rendered)} == {OPERATOR_NS}


def test_rbac_create_false_renders_no_rbac():
    for values in VARIANTS.values():
        assert rbac_objects(render({**values, "rbac": {"create": False}})) == []


def test_plain_manifest_grants_what_the_chart_grants(default_render):
    """operator/deploy/operator.yaml (the install without Helm) has the chart's ClusterRole
    rules, so the recorded run above proves them too."""
    docs = [d for d in yaml.safe_load_all((REPO_DIR / "operator" / "deploy" / "operator.yaml").read_text()) if d]
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert cluster_role["rules"] == by_kind(default_render, "ClusterRole")["rules"]
