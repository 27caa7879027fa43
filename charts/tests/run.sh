#!/usr/bin/env bash
# Checks of what we ship for Kubernetes: the Helm chart (rendered with the real Helm engine
# from PyPI helm-python-sdk, linted, validated with kubernetes-validate), its RBAC against the
# operator's API calls, its CRD against crds/ and the code, the examples, the Dockerfile and
# the kind/e2e scripts.
#
#   VENV=/path/to/venv charts/tests/run.sh [pytest args]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../../scripts/pytest.sh" "$here" "$@"
