"""The chart's alerts (templates/prometheusrule.yaml) and Grafana dashboard
(files/dashboards/outbox.json), checked with Prometheus' own tools and the real workers:

- the rules the chart renders pass `promtool check rules`, and the unit tests in alerts/ (run
  with `promtool test rules`) make every alert fire and keep it quiet in normal operation;
- every threshold, window, `for:` and severity comes from values, and changing one changes
  the rule;
- the dashboard and the alerts name only metrics the workers export, as a scrape of a running
  relay and inbox worker shows;
- a real Prometheus scraping a running relay and inbox worker (PostgreSQL and the Pub/Sub
  emulator from devkit's `outbox-stack`) evaluates the rules over their real series: the
  relay's lag alert stays quiet while rows flow, fires while the relay publishes nothing with
  rows pending, and clears once it caught up.

Needs `promtool` and `prometheus` (Debian's `prometheus` package; scripts/prereqs.sh installs
it) and `cargo build -p worker -p devkit --bins` (`make test-python` builds them)."""

import copy
import ctypes
import dataclasses
import json
import os
import pathlib
import re
import selectors
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import helm_python as helm
import pytest
import yaml

from conftest import CHART_DIR, NAMESPACE, REPO_DIR, TESTS_DIR, by_kind, render

ALERT_TESTS_DIR = TESTS_DIR / "alerts"
DASHBOARD_FILE = CHART_DIR / "files" / "dashboards" / "outbox.json"
DOCS = REPO_DIR / "docs" / "alerts.md"
TARGET_DIR = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO_DIR / "target"))

# values key (alerts.<group>.<key>) -> the alert it configures.
ALERTS = {
    ("relay", "lagging"): "OutboxRelayLagging",
    ("relay", "backlogGrowing"): "OutboxRelayBacklogGrowing",
    ("relay", "noLeader"): "OutboxRelayNoLeader",
    ("relay", "publishErrors"): "OutboxRelayPublishErrors",
    ("relay", "databaseErrors"): "OutboxRelayDatabaseErrors",
    ("relay", "deadLetters"): "OutboxRelayDeadLetters",
    ("relay", "down"): "OutboxRelayDown",
    ("relay", "notReady"): "OutboxRelayNotReady",
    ("relay", "absent"): "OutboxRelayAbsent",
    ("inbox", "lagging"): "InboxLagging",
    ("inbox", "backlogGrowing"): "InboxBacklogGrowing",
    ("inbox", "errors"): "InboxErrors",
    ("inbox", "deadLetters"): "InboxDeadLetters",
    ("inbox", "rowsParked"): "InboxRowsParked",
    ("inbox", "down"): "InboxDown",
    ("inbox", "notReady"): "InboxNotReady",
}


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package (apt-get install prometheus; "
                    "scripts/prereqs.sh does, without starting its service)")
    return path


def alert_values(**groups):
    """Chart values with the alerts on and `groups` ({"relay": {"lagging": {...}}}) merged in."""
    return {"alerts": {"enabled": True, **groups}}


def rule_object(values):
    rule = by_kind(render(values), "PrometheusRule")
    assert rule is not None, "no PrometheusRule rendered"
    return rule


def rules_by_alert(rule):
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def write_rules(path, rule, summary_only=False):
    """spec.groups of the PrometheusRule as a Prometheus rule file."""
    groups = copy.deepcopy(rule["spec"]["groups"])
    if summary_only:
        for g in groups:
            for r in g["rules"]:
                r["annotations"] = {"summary": r["annotations"]["summary"]}
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args, cwd):
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# promtool check rules / test rules


@pytest.mark.parametrize("which", ["defaults", "full"])
def test_rendered_rules_pass_promtool_check(which, tmp_path, full_render):
    rule = rule_object(alert_values()) if which == "defaults" else by_kind(full_render, "PrometheusRule")
    expected = len(ALERTS) if which == "defaults" else len(ALERTS) - 1  # values-full disables one
    result = promtool("check", "rules", str(write_rules(tmp_path / "rules.yaml", rule)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {expected} rules found" in result.stdout


def unit_test_files():
    files = sorted(ALERT_TESTS_DIR.glob("*.yaml"))
    assert files, f"no promtool unit tests in {ALERT_TESTS_DIR}"
    return files


def run_unit_tests(tmp_path, values):
    """`promtool test rules` of alerts/*.yaml against the chart rendered with `values` (each file
    names rules.yaml, written next to copies of them)."""
    write_rules(tmp_path / "rules.yaml", rule_object(values), summary_only=True)
    for f in unit_test_files():
        shutil.copy(f, tmp_path / f.name)
    return promtool("test", "rules", *[f.name for f in unit_test_files()], cwd=tmp_path)


def test_promtool_unit_tests_pass(tmp_path):
    result = run_unit_tests(tmp_path, alert_values())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(unit_test_files())


def test_unit_tests_make_every_alert_fire_and_stay_quiet():
    fires, quiet = set(), set()
    for f in unit_test_files():
        doc = yaml.safe_load(f.read_text())
        assert doc["rule_files"] == ["rules.yaml"], f.name
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(ALERTS.values())
    assert names - fires == set(), "alerts no unit test makes fire"
    assert names - quiet == set(), "alerts no unit test checks to stay quiet"
    assert (fires | quiet) - names == set(), "unit tests of alerts the chart does not have"


def test_unit_tests_fail_when_a_threshold_changes(tmp_path):
    """The unit tests test the rendered thresholds: with a lag threshold of a day, the case in
    which the relay lags 12 minutes no longer fires, and promtool says so."""
    result = run_unit_tests(tmp_path, alert_values(relay={"lagging": {"thresholdSeconds": 86400}}))
    report = result.stdout + result.stderr
    assert result.returncode != 0
    assert "alertname: OutboxRelayLagging, time: 17m" in report, report
    assert report.count("alertname:") == 1, report  # only the changed alert's case fails


# ---------------------------------------------------------------------------------------------
# values -> rules


def chart_defaults():
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.values


def test_alerts_are_opt_in(default_render):
    assert by_kind(default_render, "PrometheusRule") is None
    assert by_kind(default_render, "ConfigMap") is None
    defaults = chart_defaults()
    assert defaults["alerts"]["enabled"] is False and defaults["dashboard"]["enabled"] is False
    assert {(g, k) for g in ("relay", "inbox") for k in defaults["alerts"][g]} == set(ALERTS)


# A value per kind of setting that appears nowhere in the default rules.
SENTINELS = {
    "thresholdSeconds": 4321,
    "minRows": 8765,
    "ratio": 0.0321,
    "perSecond": 0.123,
    "threshold": 17,
    "window": "17m",
    "seenWithin": "19h",
    "for": "23m",
    "severity": "page-test",
}


def test_every_value_reaches_its_rule(tmp_path):
    defaults = chart_defaults()["alerts"]
    default_rules = rules_by_alert(rule_object(alert_values()))
    changed = {g: {k: {} for k in defaults[g]} for g in ("relay", "inbox")}
    for (group, key), name in ALERTS.items():
        for leaf in defaults[group][key]:
            if leaf != "enabled":
                assert leaf in SENTINELS, f"alerts.{group}.{key}.{leaf} has no sentinel in this test"
                changed[group][key][leaf] = SENTINELS[leaf]
    rule = rule_object(alert_values(**changed))
    rules = rules_by_alert(rule)
    assert set(rules) == set(ALERTS.values())
    for (group, key), name in ALERTS.items():
        r = rules[name]
        for leaf in defaults[group][key]:
            where = f"alerts.{group}.{key}.{leaf}"
            if leaf == "for":
                assert r["for"] == SENTINELS["for"] != default_rules[name]["for"], where
            elif leaf == "severity":
                assert r["labels"]["severity"] == SENTINELS["severity"], where
            elif leaf != "enabled":
                assert re.search(rf"(?<![\w.]){re.escape(str(SENTINELS[leaf]))}(?![\w.])", r["expr"]), (where, r["expr"])
                assert str(SENTINELS[leaf]) not in default_rules[name]["expr"], where
    result = promtool("check", "rules", str(write_rules(tmp_path / "rules.yaml", rule)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_and_durations_in_the_rules():
    """The defaults, as docs/alerts.md states them, end up in the expressions."""
    rules = rules_by_alert(rule_object(alert_values(relay={"lagging": {"thresholdSeconds": 90, "for": "2m"}})))
    assert rules["OutboxRelayLagging"]["expr"] == "max by (namespace, job) (outbox_oldest_pending_age_seconds) > 90"
    assert rules["OutboxRelayLagging"]["for"] == "2m"
    assert rules["OutboxRelayNoLeader"]["expr"] == "max by (namespace, job) (outbox_is_leader) < 1"
    assert rules["OutboxRelayDeadLetters"]["expr"] == (
        "sum by (namespace, job) (increase(outbox_dead_letter_total[15m])) > 0")
    assert rules["OutboxRelayDown"]["expr"] == (
        "up == 0 and on (namespace, job) group by (namespace, job) (last_over_time(outbox_is_leader[1d]))")
    assert rules["InboxRowsParked"]["expr"] == "max by (namespace, job) (inbox_parked_rows) > 0"
    assert rules["InboxRowsParked"]["for"] == "5m"
    assert rules["InboxRowsParked"]["labels"]["severity"] == "warning"
    # Per replica: every label of the series, `instance` and the groupBy ones included, is kept.
    assert rules["OutboxRelayNotReady"]["expr"] == "outbox_ready == 0"
    assert rules["InboxNotReady"]["expr"] == "inbox_ready == 0"
    for name in ("OutboxRelayNotReady", "InboxNotReady"):
        assert rules[name]["for"] == "5m", name
        assert rules[name]["labels"]["severity"] == "warning", name
        assert "{{ $labels.instance }}" in rules[name]["annotations"]["summary"], name


@pytest.mark.parametrize("group, key", sorted(ALERTS))
def test_an_alert_can_be_disabled(group, key):
    rules = rules_by_alert(rule_object(alert_values(**{group: {key: {"enabled": False}}})))
    assert set(rules) == set(ALERTS.values()) - {ALERTS[(group, key)]}


def test_all_alerts_of_a_group_disabled_leave_no_empty_group():
    off = {k: {"enabled": False} for (g, k) in ALERTS if g == "inbox"}
    rule = rule_object(alert_values(inbox=off))
    assert [g["name"] for g in rule["spec"]["groups"]] == ["outbox-relay"]


def test_group_by_labels_and_rule_labels(tmp_path):
    values = alert_values(groupBy=["namespace", "app_kubernetes_io_instance"], ruleLabels={"team": "payments"},
                          labels={"release": "kube-prometheus-stack"}, annotations={"a": "b"}, runbookUrl="")
    rule = rule_object(values)
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["annotations"] == {"a": "b"}
    for name, r in rules_by_alert(rule).items():
        assert r["labels"] == {"severity": r["labels"]["severity"], "team": "payments"}, name
        assert "runbook_url" not in r["annotations"], name
        assert "by (namespace, app_kubernetes_io_instance)" in r["expr"] or name.endswith(("Down", "NotReady")), name
        assert "on (namespace, app_kubernetes_io_instance)" in r["expr"] or not name.endswith("Down"), name
        assert "job" not in r["expr"], name
        assert "{{ $labels.namespace }}/{{ $labels.app_kubernetes_io_instance }}" in r["annotations"]["summary"], name
    result = promtool("check", "rules", str(write_rules(tmp_path / "rules.yaml", rule)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("change, message", [
    ({"alerts": {"relay": {"lagging": {"for": "1m1h"}}}}, "/alerts/relay/lagging/for"),
    ({"alerts": {"relay": {"lagging": {"thresholdSeconds": "5m"}}}}, "/alerts/relay/lagging/thresholdSeconds"),
    ({"alerts": {"relay": {"publishErrors": {"ratio": 5}}}}, "/alerts/relay/publishErrors/ratio"),
    ({"alerts": {"relay": {"noLeader": {"severity": "very bad"}}}}, "/alerts/relay/noLeader/severity"),
    ({"alerts": {"relay": {"splitBrain": {"enabled": True}}}}, "splitBrain"),
    ({"alerts": {"inbox": {"down": {"seenWithin": ""}}}}, "/alerts/inbox/down/seenWithin"),
    ({"alerts": {"inbox": {"rowsParked": {"threshold": -1}}}}, "/alerts/inbox/rowsParked/threshold"),
    ({"alerts": {"inbox": {"rowsParked": {"window": "5m"}}}}, "/alerts/inbox/rowsParked"),
    ({"alerts": {"relay": {"notReady": {"threshold": 0}}}}, "/alerts/relay/notReady"),
    ({"alerts": {"inbox": {"notReady": {"for": "soon"}}}}, "/alerts/inbox/notReady/for"),
    ({"alerts": {"groupBy": []}}, "/alerts/groupBy"),
    ({"alerts": {"groupBy": ["app.kubernetes.io/instance"]}}, "/alerts/groupBy/0"),
    ({"alerts": {"ruleLabels": {"team-name": "x"}}}, "invalid propertyName .team-name."),
    ({"dashboard": {"label": "not a label"}}, "/dashboard/label"),
    ({"dashboard": {"labelValue": "x" * 64}}, "/dashboard/labelValue"),
])
def test_values_schema_refuses(change, message):
    with pytest.raises(helm.HelmError, match=message):
        render(change)


def test_prometheus_rule_shape():
    """monitoring.coreos.com is not in the official schemas: the fields against the Prometheus
    Operator's PrometheusRule v1 API (Rule: alert, expr, for, labels, annotations)."""
    rule = rule_object(alert_values())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert set(rule["spec"]) == {"groups"}
    assert [g["name"] for g in rule["spec"]["groups"]] == ["outbox-relay", "outbox-inbox"]
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
            assert all(isinstance(v, str) for v in [r["expr"], r["for"], *r["labels"].values(), *r["annotations"].values()])


def test_every_alert_says_what_it_means_and_what_to_do():
    docs = DOCS.read_text()
    headings = re.findall(r"^### (\w+)$", docs, re.M)
    assert sorted(headings) == sorted(ALERTS.values()), "docs/alerts.md needs one ### heading per alert"
    for (group, key), name in ALERTS.items():
        assert f"alerts.{group}.{key}" in docs, f"docs/alerts.md does not name the values of {name}"
    for name, r in rules_by_alert(rule_object(alert_values())).items():
        a = r["annotations"]
        assert set(a) == {"summary", "description", "runbook_url"}, name
        assert a["runbook_url"].endswith("docs/alerts.md#" + name.lower()), name
        assert r["labels"]["severity"] in ("warning", "critical"), name
        assert len(a["description"]) > 200, name
        # What to do: every description points at something to check or change.
        assert re.search(r"\b(Check|check|Read|read|Look|look|Scale|Fix|fix|raise|silence)\b", a["description"]), name


# ---------------------------------------------------------------------------------------------
# The dashboard


def dashboard():
    return json.loads(DASHBOARD_FILE.read_text())


def panels(board):
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_queries(board):
    """(where, PromQL) of every panel target and query variable."""
    for p in panels(board):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} {t['refId']}", t["expr"]
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, f"variable {v['name']}: {q}"
            yield f"variable {v['name']}", m.group(1)


def test_dashboard_config_map(full_render):
    cm = by_kind(render({"dashboard": {"enabled": True}}), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert json.loads(cm["data"]["outbox.json"]) == dashboard()
    custom = by_kind(render({"dashboard": {"enabled": True, "label": "example.com/dashboard",
                                           "labelValue": "outbox", "namespace": "grafana"}}), "ConfigMap")
    assert custom["metadata"]["labels"]["example.com/dashboard"] == "outbox"
    assert "grafana_dashboard" not in custom["metadata"]["labels"]
    assert custom["metadata"]["namespace"] == "grafana"
    full = by_kind(full_render, "ConfigMap")
    assert full["metadata"]["annotations"] == {"grafana_folder": "Outbox"}
    assert full["metadata"]["labels"]["example.com/team"] == "payments"


def test_dashboard_structure():
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "relay", "inbox"} <= set(variables)
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            # Every query is scoped by the variables of its side.
            assert '$namespace' in t["expr"] and ('$relay' in t["expr"] or '$inbox' in t["expr"]), (p["title"], t["expr"])
    exprs = " ".join(e for _, e in dashboard_queries(board))
    for needed in [
        "outbox_messages_published_total",  # throughput
        "outbox_oldest_pending_age_seconds",  # lag
        "outbox_backlog",  # backlog
        "histogram_quantile(0.99, sum by (namespace, job, le) (rate(outbox_publish_latency_seconds_bucket",  # latency
        "outbox_publish_errors_total",  # errors
        "outbox_dead_letter_total",  # dead letters
        "outbox_is_leader",  # leader
        "sum by (namespace, job) (outbox_ready",  # ready replicas
        "inbox_messages_stored_total",
        "inbox_oldest_unprocessed_age_seconds",
        "inbox_backlog",
        "histogram_quantile(0.99, sum by (namespace, job, le) (rate(inbox_store_latency_seconds_bucket",
        "inbox_dead_letter_total",
        "inbox_parked_rows",
        "sum by (namespace, job) (inbox_ready",
    ]:
        assert needed in exprs, needed


# ---------------------------------------------------------------------------------------------
# Metric names in the queries against what the workers export

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "atan2", "inf", "nan"}


def metric_names(expr):
    """The metric names a PromQL expression selects (functions, keywords, label names, strings,
    durations and Grafana variables left out)."""
    names = set()
    for m in re.finditer(r'__name__\s*=~?\s*"([^"]*)"', expr):
        names |= set(m.group(1).split("|"))
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_metric_name_extraction():
    assert metric_names(
        'histogram_quantile(0.99, sum by (namespace, job, le) (rate(outbox_publish_latency_seconds_bucket'
        '{namespace=~"$namespace", job=~"$relay"}[$__rate_interval])))') == {"outbox_publish_latency_seconds_bucket"}
    assert metric_names(
        "up == 0 and on (namespace, job) group by (namespace, job) (last_over_time(outbox_is_leader[1d]))"
    ) == {"up", "outbox_is_leader"}
    assert metric_names('{__name__=~"outbox_is_leader|inbox_backlog"}') == {"outbox_is_leader", "inbox_backlog"}
    assert metric_names("sum(rate(a_total[5m] offset 1h)) / 1e3 > bool 0.5") == {"a_total"}


def series_names(exposition):
    """Series names in a /metrics body (OpenMetrics): the samples, and what each `# TYPE` line
    declares (a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`)."""
    names = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names |= {family + s for s in suffixes.get(kind, [""])}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][\w:]*", line).group(0))
    return names


def test_queries_name_only_metrics_the_workers_export(live):
    # `up` is Prometheus' own, for every target.
    exported = live.exported | {"up"}
    unknown = []
    for where, expr in dashboard_queries(dashboard()):
        unknown += [(where, n) for n in sorted(metric_names(expr) - exported)]
    for name, r in rules_by_alert(rule_object(alert_values())).items():
        unknown += [(name, n) for n in sorted(metric_names(r["expr"]) - exported)]
    assert unknown == [], f"names the workers do not export (they export {sorted(live.exported)})"
    # The readiness gauges of the NotReady alerts, by name (worker/src/metrics.rs).
    assert {"outbox_ready", "inbox_ready"} <= exported
    # The check has teeth: a misspelt name, or a histogram suffix on a gauge, is caught.
    assert metric_names("rate(outbox_messages_publishd_total[5m])") - exported == {"outbox_messages_publishd_total"}
    assert metric_names("outbox_backlog_bucket") - exported == {"outbox_backlog_bucket"}


# ---------------------------------------------------------------------------------------------
# A real Prometheus over a running relay and inbox worker

LIVE_NAMESPACE = "alerts-test"
RELAY_JOB, INBOX_JOB = "orders-relay", "orders-inbox"
LAG_THRESHOLD = 4  # seconds
# Short `for:` and windows, so that the live test takes seconds; the rest keeps its defaults
# and must evaluate without errors over the real series.
LIVE_VALUES = alert_values(relay={
    "lagging": {"thresholdSeconds": LAG_THRESHOLD, "for": "1s"},
    "noLeader": {"for": "1s"},
    "down": {"for": "1s", "seenWithin": "10m"},
    "absent": {"for": "1s", "seenWithin": "10m"},
    "deadLetters": {"window": "10m"},
    "notReady": {"for": "2s"},
}, inbox={"rowsParked": {"for": "1s"}, "notReady": {"for": "2s"}})
# The relays' election lock (worker/src/leader/postgres.rs: KEY_SPACE << 32 | the table's OID).
LEADER_LOCK_KEY = "(x'6f6272'::bigint << 32) | 'outbox'::regclass::oid::bigint"


def binary(env, name, build):
    path = pathlib.Path(os.environ.get(env) or TARGET_DIR / "debug" / name)
    if not path.exists():
        pytest.fail(f"{path} not found: build it with `{build}` (make test-python does), or set {env}")
    return str(path)


def psql_binary():
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(pathlib.Path(os.environ["PG_BIN"]) / "psql")
    candidates += sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/psql"),
                         key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0, reverse=True)
    found = next((str(p) for p in candidates if p.exists()), None) or shutil.which("psql")
    if found is None:
        pytest.fail("psql not found (apt-get install postgresql-client, or PG_BIN)")
    return found


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_pytest():
    # PR_SET_PDEATHSIG: the kernel kills the child if pytest dies without cleaning up.
    _libc.prctl(1, signal.SIGKILL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, timeout, diagnose=lambda: ""):
    """Polls `check` until it returns something true; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
        except (OSError, urllib.error.URLError, ValueError, KeyError) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{diagnose()}")
        time.sleep(0.2)


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


class Processes:
    """Every process the live tests start; all are stopped at the end, whatever happened."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.started = []

    def start(self, name, argv, env=None, stdin=subprocess.DEVNULL, stdout=None):
        log = self.log_dir / f"{name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=stdout or out, stderr=out,
                                preexec_fn=_die_with_pytest)
        out.close()
        proc.name, proc.log = name, log
        self.started.append(proc)
        return proc

    @staticmethod
    def stop(proc, timeout=20):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self):
        for proc in reversed(self.started):
            if proc.stdin:
                try:
                    proc.stdin.close()  # outbox-stack stops when its stdin closes
                except OSError:
                    pass
            self.stop(proc)

    def tails(self):
        out = []
        for proc in self.started:
            text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
            out.append(f"--- {proc.name} (exit {proc.poll()}) {proc.log}\n{text[-3000:]}")
        return "\n".join(out)


@dataclasses.dataclass
class Live:
    procs: Processes
    infra: dict
    worker: str
    psql: str
    relay_port: int
    inbox_port: int
    prom: str
    relay: subprocess.Popen = None
    exported: set = None

    def sql(self, query):
        result = subprocess.run([self.psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", self.infra["database_url"],
                                 "-c", query], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def worker_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DATABASE_URL", "PUBSUB_"))}
        env.update(PUBSUB_EMULATOR_HOST=self.infra["emulator_host"], RUST_LOG="info", LOG_FORMAT="text")
        return env

    def start_relay(self, topic=None):
        """Starts the relay (on the scraped port); with another topic than the stack's, one that
        cannot be ready, without waiting for it to be."""
        self.relay = self.procs.start("relay", [
            self.worker, "relay", "--database-url", self.infra["database_url"], "--topic", topic or self.infra["topic"],
            "--health-addr", f"127.0.0.1:{self.relay_port}", "--probe-interval", "500ms",
            "--leader-election", "postgres", "--max-publish-attempts", "1", "--retry-max", "1s",
        ], env=self.worker_env())
        if topic is None:
            wait_until("the relay to be ready", lambda: self.ready(self.relay_port), 60, self.procs.tails)

    @staticmethod
    def ready(port):
        try:
            return http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        except urllib.error.HTTPError:
            return False

    def scrape(self, port):
        return http_get(f"http://127.0.0.1:{port}/metrics")[1]

    def api(self, path, **params):
        url = f"{self.prom}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = json.loads(http_get(url)[1])
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql):
        return self.api("query", query=promql)["result"]

    def alerts(self, name, state="firing"):
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]

    def wait_alert(self, name, timeout=60):
        return wait_until(f"{name} to fire", lambda: self.alerts(name), timeout, self.diagnose)

    def wait_no_alert(self, name, timeout=60):
        wait_until(f"{name} to clear",
                   lambda: not [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name],
                   timeout, self.diagnose)

    def pending_rows(self):
        return int(self.sql("SELECT count(*) FROM outbox"))

    def diagnose(self):
        try:
            alerts = json.dumps(self.api("alerts")["alerts"], indent=1)[-3000:]
        except Exception as e:  # noqa: BLE001 (diagnostics only)
            alerts = repr(e)
        return f"Prometheus alerts: {alerts}\n{self.procs.tails()}"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """PostgreSQL and the emulator (outbox-stack), a migrated outbox and inbox, a relay and an
    inbox worker, and a Prometheus scraping both every second and evaluating the chart's rules
    (rendered with LIVE_VALUES). One dead-lettered row makes the error series exist."""
    prometheus_bin = tool("prometheus")
    worker = binary("OUTBOX_WORKER_BIN", "outbox-worker", "cargo build -p worker --bins")
    stack_bin = binary("OUTBOX_STACK_BIN", "outbox-stack", "cargo build -p devkit --bins")
    tmp = tmp_path_factory.mktemp("alerts-live")
    procs = Processes(tmp)
    try:
        stack = procs.start("outbox-stack", [stack_bin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with selectors.DefaultSelector() as sel:
            sel.register(stack.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=120):
                pytest.fail(f"outbox-stack printed nothing within 120s\n{procs.tails()}")
        line = stack.stdout.readline()
        if not line:
            pytest.fail(f"outbox-stack exited\n{procs.tails()}")
        infra = json.loads(line)
        live = Live(procs, infra, worker, psql_binary(), free_port(), free_port(), "")
        migrate = subprocess.run([worker, "migrate", "--database-url", infra["database_url"]],
                                 capture_output=True, text=True, timeout=60, env=live.worker_env())
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr

        procs.start("inbox", [
            worker, "inbox", "--database-url", infra["database_url"], "--subscription", infra["subscription"],
            "--health-addr", f"127.0.0.1:{live.inbox_port}", "--probe-interval", "500ms", "--streams", "1",
        ], env=live.worker_env())
        wait_until("the inbox worker to be ready", lambda: live.ready(live.inbox_port), 60, procs.tails)
        live.start_relay()

        rules = write_rules(tmp / "rules.yaml", rule_object(LIVE_VALUES))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                                      "labels": {"namespace": LIVE_NAMESPACE}}]}
                for job, port in [(RELAY_JOB, live.relay_port), (INBOX_JOB, live.inbox_port)]
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        live.prom = f"http://127.0.0.1:{port}"
        procs.start("prometheus", [
            prometheus_bin, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ])
        wait_until("Prometheus to be ready", lambda: http_get(live.prom + "/-/ready")[0] == 200, 60, procs.tails)
        wait_until("both targets to be up", lambda: [t["health"] for t in live.api("targets")["activeTargets"]]
                   == ["up", "up"], 60, live.diagnose)

        # A row for a topic that does not exist: refused once (a transient publish error), then
        # dead-lettered (--max-publish-attempts 1), so that the error series exist too.
        live.sql("INSERT INTO outbox (payload, topic) VALUES ('poison', 'no-such-topic')")
        wait_until("the row to be dead-lettered", lambda: live.sql("SELECT count(*) FROM outbox_dead_letter") == "1",
                   60, live.diagnose)
        wait_until("the relay to export its error series",
                   lambda: 'outbox_publish_errors_total{kind="permanent"}' in live.scrape(live.relay_port), 30)
        live.exported = series_names(live.scrape(live.relay_port)) | series_names(live.scrape(live.inbox_port))
        yield live
    finally:
        procs.stop_all()


def test_live_rules_evaluate_over_the_real_series(live):
    def all_evaluated():
        rules = [r for g in live.api("rules")["groups"] for r in g["rules"]]
        assert len(rules) == len(ALERTS)
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
        assert bad == [], bad
        return all(r["health"] == "ok" for r in rules)

    wait_until("every rule to be evaluated", all_evaluated, 30, live.diagnose)
    # The dead-lettered row of the fixture, through the real counters.
    (alert,) = live.wait_alert("OutboxRelayDeadLetters")
    assert alert["labels"]["job"] == RELAY_JOB and alert["labels"]["namespace"] == LIVE_NAMESPACE


def test_live_lag_alert_follows_the_relay(live):
    # 1. The relay leads and publishes while rows keep coming: the lag alert stays quiet. This is
    #    an observation window (a negative cannot be waited for): at least threshold + `for` + 3
    #    evaluations, with rows inserted all along.
    window = LAG_THRESHOLD + 1 + 3
    start = time.monotonic()
    inserted = 0

    def observed_long_enough():
        nonlocal inserted
        live.sql("INSERT INTO outbox (payload) SELECT convert_to('row ' || g, 'UTF8') FROM generate_series(1, 20) g")
        inserted += 20
        return time.monotonic() - start > window

    wait_until("the observation window", observed_long_enough, window + 30)
    wait_until("the outbox to drain", lambda: live.pending_rows() == 0, 60, live.diagnose)
    seconds = int(time.monotonic() - start) + 1
    assert live.query(f'count_over_time(ALERTS{{alertname="OutboxRelayLagging"}}[{seconds}s])') == [], \
        "the lag alert went off while the relay was publishing"
    published = live.query(f'increase(outbox_messages_published_total{{job="{RELAY_JOB}"}}[{seconds}s])')
    assert published and float(published[0]["value"][1]) >= inserted / 2, (published, inserted)
    max_lag = live.query(f'max_over_time(outbox_oldest_pending_age_seconds{{job="{RELAY_JOB}"}}[{seconds}s])')
    assert float(max_lag[0]["value"][1]) < LAG_THRESHOLD

    # 2. The relay stops: its target goes down, and no replica of it reports any more.
    # (The inbox worker leads with its own lock, in another key space, on the inbox table.)
    held = live.sql("SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted").split()
    assert live.sql(f"SELECT {LEADER_LOCK_KEY}") in held, \
        "the relay does not lead with the lock this test takes (worker/src/leader/postgres.rs changed?)"
    assert Processes.stop(live.relay) == 0
    for name in ("OutboxRelayDown", "OutboxRelayAbsent"):
        (alert,) = live.wait_alert(name)
        assert alert["labels"]["job"] == RELAY_JOB
    # With rows pending and nothing to measure their age, the lag alert cannot fire: the
    # dashboard and OutboxRelayDown/Absent cover a relay without any replica. Like the
    # operator's Deployments (two replicas), a standby is what reports the lag: the relay comes
    # back as a standby, since the lock is held by a "leader" that publishes nothing.
    lock = live.procs.start("lock-holder", [live.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
                                            live.infra["database_url"]], stdin=subprocess.PIPE)
    lock.stdin.write(f"SELECT pg_advisory_lock({LEADER_LOCK_KEY});\n".encode())
    lock.stdin.flush()
    wait_until("the test to hold the relay's lock", lambda: live.sql(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        f"WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'psql' "
        f"AND ((l.classid::bigint << 32) | l.objid::bigint) = {LEADER_LOCK_KEY}") == "1", 30, live.diagnose)
    live.sql("INSERT INTO outbox (payload) SELECT convert_to('late ' || g, 'UTF8') FROM generate_series(1, 50) g")
    live.start_relay()
    standby_since = time.monotonic()

    (alert,) = live.wait_alert("OutboxRelayLagging")
    assert alert["labels"] == {"alertname": "OutboxRelayLagging", "namespace": LIVE_NAMESPACE, "job": RELAY_JOB,
                               "severity": "critical"}
    assert float(alert["value"]) > LAG_THRESHOLD
    assert alert["annotations"]["summary"].startswith(
        f"Outbox relay {LIVE_NAMESPACE}/{RELAY_JOB}: the oldest pending row has waited ")
    live.wait_alert("OutboxRelayNoLeader")
    live.wait_no_alert("OutboxRelayDown")
    assert live.pending_rows() == 50, "the standby published"
    # A standby is ready (its dependencies answer; not leading is no failure): it reported
    # outbox_ready 1 all along, and OutboxRelayNotReady stays quiet.
    seconds = int(time.monotonic() - standby_since)
    assert seconds >= 3, seconds
    ready = live.query(f'min_over_time(outbox_ready{{job="{RELAY_JOB}"}}[{seconds}s])')
    assert [r["value"][1] for r in ready] == ["1"], ready
    assert [a for a in live.api("alerts")["alerts"] if a["labels"]["alertname"] == "OutboxRelayNotReady"] == []
    for a in live.api("alerts")["alerts"]:
        for text in a["annotations"].values():
            assert "{{" not in text and "<no value>" not in text, text

    # 3. The "leader" lets go: the relay takes over, catches up, and the alerts clear.
    lock.stdin.close()
    assert lock.wait(30) == 0
    wait_until("the relay to catch up", lambda: live.pending_rows() == 0, 60, live.diagnose)
    live.wait_no_alert("OutboxRelayLagging")
    live.wait_no_alert("OutboxRelayNoLeader")
    live.wait_no_alert("OutboxRelayAbsent")
    # The inbox worker ran through all of it without an alert, and no relay replica was found
    # not ready (a restarting one may show 0 until its first probe: not for `for`).
    seconds = int(time.monotonic() - start) + 1
    assert live.query(f'count_over_time(ALERTS{{alertname=~"Inbox.*"}}[{seconds}s])') == []
    assert live.query(f'count_over_time(ALERTS{{alertname="OutboxRelayNotReady", alertstate="firing"}}[{seconds}s])') == []


def test_live_not_ready_alert(live):
    """A relay replica whose topic does not exist runs and is scraped, but is not ready:
    outbox_ready 0, and OutboxRelayNotReady fires for that replica (instance) while /readyz
    names the topic; the relay back with its topic is ready and the alert clears."""
    assert live.pending_rows() == 0  # nothing for the broken relay to dead-letter
    assert Processes.stop(live.relay) == 0
    missing = f"projects/{live.infra['project']}/topics/no-such-topic"
    live.start_relay(topic=missing)

    def readyz_body():
        # Until the first probe ran, /readyz says "not checked yet": wait for the verdict.
        try:
            http_get(f"http://127.0.0.1:{live.relay_port}/readyz")
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            return e.code == 503 and "does not exist" in body and body
        return False

    body = wait_until("the relay to say why it is not ready", readyz_body, 60, live.procs.tails)
    assert f"pubsub: topic {missing} does not exist" in body, body
    (alert,) = live.wait_alert("OutboxRelayNotReady")
    instance = f"127.0.0.1:{live.relay_port}"
    assert alert["labels"] == {"alertname": "OutboxRelayNotReady", "namespace": LIVE_NAMESPACE, "job": RELAY_JOB,
                               "instance": instance, "severity": "warning"}
    assert alert["annotations"]["summary"] == f"Outbox relay {LIVE_NAMESPACE}/{RELAY_JOB}: replica {instance} is not ready"
    assert "{{" not in alert["annotations"]["description"]

    assert Processes.stop(live.relay) == 0
    live.start_relay()
    live.wait_no_alert("OutboxRelayNotReady")
    assert live.alerts("InboxNotReady", state="pending") == [] and live.alerts("InboxNotReady") == []


def test_live_parked_rows_alert(live):
    """Rows the application's processor parked, counted by the inbox worker's probe
    (inbox_parked_rows): InboxRowsParked fires with their number, and clears once they are
    skipped the way docs/alerts.md says (processed, parked_at cleared)."""
    live.sql("INSERT INTO inbox (message_id, payload, ordering_key, attempts, last_error, parked_at) "
             "SELECT 'parked-' || g, convert_to('poison', 'UTF8'), 'key-1', 5, 'handler failed', clock_timestamp() "
             "FROM generate_series(1, 3) g")
    (alert,) = live.wait_alert("InboxRowsParked")
    assert alert["labels"] == {"alertname": "InboxRowsParked", "namespace": LIVE_NAMESPACE, "job": INBOX_JOB,
                               "severity": "warning"}
    assert alert["annotations"]["summary"] == f"Inbox {LIVE_NAMESPACE}/{INBOX_JOB}: 3 rows are parked"
    live.sql("UPDATE inbox SET processed_at = clock_timestamp(), parked_at = NULL WHERE message_id LIKE 'parked-%'")
    live.wait_no_alert("InboxRowsParked")


def test_live_dashboard_queries_run(live):
    """Every dashboard query, with its variables set to "All", runs on the real Prometheus and
    returns series (after the tests above, every metric has samples)."""
    board = dashboard()
    empty = []
    for where, expr in dashboard_queries(board):
        promql = (expr.replace("$__rate_interval", "1m").replace("$namespace", ".*")
                  .replace("$relay", ".*").replace("$inbox", ".*"))
        if not live.query(promql):
            empty.append(where)
    assert empty == []
    namespaces = {r["metric"].get("namespace") for r in live.query('{__name__=~"outbox_is_leader|inbox_backlog"}')}
    assert namespaces == {LIVE_NAMESPACE}
