#!/usr/bin/env bash
# Python checks of the operator's output: rendered objects against the official Kubernetes
# schemas (kubernetes-validate), sample OutboxRelays against the CRD schema (jsonschema).
#
#   VENV=/path/to/venv operator/tests/python/run.sh [pytest args]
#
# Uses $OUTBOX_OPERATOR_BIN if set, else builds target/debug/outbox-operator.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
VENV="${VENV:-$repo/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "no virtualenv at $VENV; create it with:" >&2
  echo "  python3 -m venv $VENV && $VENV/bin/pip install pytest kubernetes-validate jsonschema pyyaml" >&2
  exit 2
fi
if [[ -z "${OUTBOX_OPERATOR_BIN:-}" ]]; then
  (cd "$repo" && cargo build -q -p operator --bin outbox-operator)
  export OUTBOX_OPERATOR_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/outbox-operator"
fi
cd "$here"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" .
