"""The data path of the kind quickstart and of scripts/e2e.sh, against the real Pub/Sub
emulator and PostgreSQL that `make test` already needs (each part is skipped when they are not
installed):

- the pubsub-setup Job's script from examples/dev/ creates the topic and the two ordered
  subscriptions (e2e.sh's and the InboxRelay's), and is idempotent;
- e2e.sh's pull / acknowledge / count / ordering helpers work on what the emulator returns;
- e2e.sh's INSERT of rows, its "outbox drained" check and its inbox-table count and order
  checks work on the schema the migrations create.

`kubectl exec <pod> -- CMD...` is replaced by a shim running CMD here."""

import base64
import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest
import yaml

from conftest import EXAMPLES_DIR, REPO_DIR

EMULATOR_BIN = pathlib.Path(
    os.environ.get("PUBSUB_EMULATOR_BIN", "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
)
PROJECT, TOPIC, SUBSCRIPTION = "local-dev-project", "orders", "orders-sub"
INBOX_SUBSCRIPTION = "orders-inbox"
IN_CLUSTER = "http://pubsub-emulator.outbox-dev.svc:8085"

needs_emulator = pytest.mark.skipif(
    not EMULATOR_BIN.exists() or shutil.which("java") is None or shutil.which("curl") is None,
    reason="Pub/Sub emulator, java or curl not installed (scripts/prereqs.sh installs them)",
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, method="POST"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(EMULATOR_BIN), "--host=127.0.0.1", f"--port={port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"emulator did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def setup_job_script():
    job = yaml.safe_load((EXAMPLES_DIR / "dev" / "pubsub-setup-job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0], {e["name"]: e["value"] for e in container["env"]}


@pytest.fixture(scope="module")
def subscription(emulator, tmp_path_factory):
    script, env = setup_job_script()
    # The Job's emptyDir /tmp is this test's temporary directory.
    tmp = tmp_path_factory.mktemp("job")
    script = script.replace("/tmp/", f"{tmp}/")
    env = {**os.environ, **env, "EMULATOR": emulator}
    for expected in ("created", "exists "):  # a second run finds all three and succeeds
        result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(expected) == 3, result.stdout
    return emulator


@needs_emulator
@pytest.mark.parametrize("name", [SUBSCRIPTION, INBOX_SUBSCRIPTION])
def test_setup_job_creates_an_ordered_subscription(subscription, name):
    sub = call(f"{subscription}/v1/projects/{PROJECT}/subscriptions/{name}", method="GET")
    assert sub["topic"] == f"projects/{PROJECT}/topics/{TOPIC}"
    assert sub["enableMessageOrdering"] is True


def test_inbox_subscription_is_the_inboxrelays():
    inbox = yaml.safe_load((EXAMPLES_DIR / "inboxrelay.yaml").read_text())
    assert inbox["spec"]["pubsub"]["subscription"] == f"projects/{PROJECT}/subscriptions/{INBOX_SUBSCRIPTION}"


def e2e_functions():
    """The helper functions of scripts/e2e.sh (everything between `k()` and the first step)."""
    text = (REPO_DIR / "scripts" / "e2e.sh").read_text()
    start = text.index("\nk() {")
    end = text.index("\n# ----")
    return text[start:end]


def run_helpers(tmp_path, emulator, commands, env=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "kubectl"
    # `kubectl ... exec [-i] POD -- CMD...` runs CMD here, with the in-cluster URL rewritten.
    shim.write_text(
        "#!/usr/bin/env bash\n"
        'while [[ $# -gt 0 && "$1" != -- ]]; do shift; done\n'
        '[[ $# -gt 0 ]] || exit 0\n'
        "shift\n"
        f"from='{IN_CLUSTER}' to='{emulator}'\n"
        'exec "${@//"$from"/"$to"}"\n'
    )
    shim.chmod(0o755)
    harness = tmp_path / "harness.sh"
    harness.write_text(
        "set -euo pipefail\n"
        "context=test ns=outbox-dev relay=orders inbox=orders op_ns=outbox-system client=e2e-client\n"
        f"project={PROJECT} subscription={SUBSCRIPTION} run_id=t1\n"
        f'work="{tmp_path}/work"; mkdir -p "$work"; seen="$work/seen.txt"; : >"$seen"\n'
        + e2e_functions()
        + "\ndiagnostics() { :; }\n"
        + commands
    )
    env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(harness)], env=env, capture_output=True, text=True, timeout=300)


def publish(emulator, rows):
    topic = f"{emulator}/v1/projects/{PROJECT}/topics/{TOPIC}:publish"
    for start in range(0, len(rows), 100):
        call(topic, {"messages": [
            {"data": base64.b64encode(f"e2e-t1-{g}".encode()).decode(), "orderingKey": f"k{g % 10}"}
            for g in rows[start:start + 100]
        ]})


@needs_emulator
def test_e2e_helpers_receive_every_row_in_key_order(subscription, tmp_path):
    publish(subscription, list(range(1, 301)))
    result = run_helpers(tmp_path, subscription, 'wait_until 60 "rows" received 1 300\ncheck_order 1 300\n')
    assert result.returncode == 0, result.stdout + result.stderr
    assert "received 300 of 300 (rows 1..300)" in result.stdout
    # Everything was acknowledged: nothing is left to pull.
    left = call(f"{subscription}/v1/projects/{PROJECT}/subscriptions/{SUBSCRIPTION}:pull",
                {"maxMessages": 10, "returnImmediately": True})
    assert left.get("receivedMessages", []) == []


@needs_emulator
def test_e2e_helpers_notice_missing_rows(subscription, tmp_path):
    publish(subscription, [401, 402])
    result = run_helpers(tmp_path, subscription, "received 401 403\n")
    assert result.returncode != 0
    assert "received 2 of 3 (rows 401..403)" in result.stdout


@needs_emulator
def test_e2e_order_check_notices_reordering(subscription, tmp_path):
    publish(subscription, [520, 510])  # same key k0, wrong order
    result = run_helpers(tmp_path, subscription, "drain\ncheck_order 510 520\n")
    assert result.returncode != 0
    assert "out of order" in result.stdout


def pg_bin():
    if os.environ.get("PG_BIN"):
        return pathlib.Path(os.environ["PG_BIN"])
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


needs_postgres = pytest.mark.skipif(
    pg_bin() is None or shutil.which("psql") is None,
    reason="PostgreSQL server binaries or psql not installed (scripts/prereqs.sh installs them)",
)


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A throwaway server with the role and database of examples/dev/, migrated."""
    import pwd

    bin_dir = pg_bin()
    # Not under pytest's basetemp: as root that is private to root, and the server runs as
    # the `postgres` user.
    root = pathlib.Path(tempfile.mkdtemp(prefix="outbox-e2e-pg-"))
    data = root / "data"
    demote = None
    if os.getuid() == 0:  # initdb and postgres refuse to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)

        def demote():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

    subprocess.run([str(bin_dir / "initdb"), "-D", str(data), "-U", "outbox", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, preexec_fn=demote)
    port = free_port()
    proc = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                             "-k", str(root), "-c", "fsync=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=demote)
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(port)}
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["psql", "-U", "outbox", "-d", "postgres", "-c", "SELECT 1"], env={**os.environ, **env},
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "postgres did not start"
            time.sleep(0.3)
        psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "outbox"]
        subprocess.run(psql + ["-d", "postgres", "-c", "CREATE DATABASE outbox"], env={**os.environ, **env}, check=True)
        for migration in sorted((REPO_DIR / "migrations").glob("*.sql")):
            subprocess.run(psql + ["-d", "outbox", "-f", str(migration)], env={**os.environ, **env},
                           check=True, capture_output=True)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@needs_postgres
def test_e2e_inserts_rows_the_relay_reads(postgres, tmp_path):
    result = run_helpers(
        tmp_path, "unused",
        "insert_rows 1 1000\n"
        "psql_dev \"SELECT count(*), count(DISTINCT ordering_key), min(convert_from(payload, 'UTF8')) FROM outbox\"\n"
        "if outbox_empty; then echo EMPTY; else echo NOT-EMPTY; fi\n"
        "psql_dev 'DELETE FROM outbox' >/dev/null\n"
        "if outbox_empty; then echo EMPTY; else echo NOT-EMPTY; fi\n",
        env=postgres,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000|10|e2e-t1-1", "NOT-EMPTY", "EMPTY"]


def fill_inbox(postgres, rows, run_id="t1"):
    """Rows as the inbox worker stores them (payload = the message data), in this order."""
    values = ", ".join(f"('{run_id}-{g}', convert_to('e2e-{run_id}-{g}', 'UTF8'), 'k{g % 10}')" for g in rows)
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", "outbox", "-d", "outbox", "-c",
                    f"INSERT INTO inbox (message_id, payload, ordering_key) VALUES {values}"],
                   env={**os.environ, **postgres}, check=True, capture_output=True)


@needs_postgres
def test_e2e_inbox_checks_find_every_row_in_key_order(postgres, tmp_path):
    # Another run's rows and a payload that is not UTF-8 do not disturb the checks.
    fill_inbox(postgres, range(1, 6), run_id="other")
    subprocess.run(["psql", "-X", "-q", "-U", "outbox", "-d", "outbox", "-c",
                    "INSERT INTO inbox (message_id, payload) VALUES ('binary', '\\xff00'::bytea)"],
                   env={**os.environ, **postgres}, check=True, capture_output=True)
    fill_inbox(postgres, range(1, 301))
    result = run_helpers(tmp_path, "unused", "in_inbox 1 300\ncheck_inbox_order 1 300\n", env=postgres)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "inbox holds 300 of 300 (rows 1..300)" in result.stdout
    result = run_helpers(tmp_path, "unused", "in_inbox 1 301\n", env=postgres)
    assert result.returncode != 0
    assert "inbox holds 300 of 301 (rows 1..301)" in result.stdout
    # process_inbox marks this run's rows processed, and only them.
    result = run_helpers(
        tmp_path, "unused",
        "process_inbox\n"
        "psql_dev \"SELECT count(*) FILTER (WHERE processed_at IS NULL), count(*) FROM inbox"
        " WHERE position(convert_to('e2e-t1-', 'UTF8') IN payload) = 1\"\n"
        "psql_dev \"SELECT count(*) FROM inbox WHERE processed_at IS NULL\"\n",
        env=postgres,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0|300", "6"]  # the other run's 5 rows and the binary one


@needs_postgres
def test_e2e_inbox_order_check_notices_reordering(postgres, tmp_path):
    fill_inbox(postgres, [620, 610])  # same key k0, stored in the wrong order
    result = run_helpers(tmp_path, "unused", "in_inbox 610 610\nin_inbox 620 620\ncheck_inbox_order 610 620\n",
                         env=postgres)
    assert result.returncode != 0
    assert "out of order" in result.stdout


@needs_postgres
@pytest.mark.parametrize("table", ["outbox", "inbox"])
def test_worker_tables_exist_after_the_migrations(postgres, table):
    out = subprocess.run(["psql", "-X", "-t", "-A", "-U", "outbox", "-d", "outbox", "-c",
                          "SELECT to_regclass('public.' || %r) IS NOT NULL" % table],
                         env={**os.environ, **postgres}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "t"
