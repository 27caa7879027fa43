#!/usr/bin/env bash
# Python checks of the operator's output: rendered objects against the official Kubernetes
# schemas (kubernetes-validate), sample OutboxRelays against the CRD schema (jsonschema).
#
#   VENV=/path/to/venv operator/tests/python/run.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../../../scripts/pytest.sh" "$here" "$@"
