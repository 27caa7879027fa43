"""How the Python checks call `outbox-operator`: the binary in $OUTBOX_OPERATOR_BIN
(what `make test-python` builds), else `cargo run`. Shared by operator/tests/python and
charts/tests through their conftest.py."""

import os
import pathlib
import subprocess

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]


def operator_command():
    binary = os.environ.get("OUTBOX_OPERATOR_BIN")
    if binary:
        return [binary]
    return ["cargo", "run", "-q", "-p", "operator", "--"]


def run_operator(*args, check=True, stdin=None):
    result = subprocess.run(
        operator_command() + list(args),
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"outbox-operator {' '.join(args)} failed:\n{result.stderr}")
    return result
