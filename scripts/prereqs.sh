#!/usr/bin/env bash
# Makes sure what the tests, the demo and the benchmarks run against is on this
# machine: PostgreSQL server binaries, Java 17 and the Pub/Sub emulator, and
# for the chart/manifest checks Prometheus, promtool and a Python virtualenv.
# Installs what it can (Debian packages when running as root, PyPI packages
# into .venv); for the rest it says exactly what to install and fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$repo/.venv}"
want_python="${1:-python}"

apt_install() {
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "prereqs: installing $* with apt-get" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null; then
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
    fi
  else
    echo "prereqs: missing $*; install with: sudo apt-get install $*" >&2
    return 1
  fi
}

# PostgreSQL server binaries (initdb, postgres).
if [[ -z "${PG_BIN:-}" ]] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi

# Java for the emulator.
if ! command -v java >/dev/null; then
  apt_install openjdk-17-jre-headless
fi

# The Pub/Sub emulator ships with the Google Cloud CLI, not with Debian.
emulator="${PUBSUB_EMULATOR_BIN:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator}"
if [[ ! -x "$emulator" ]]; then
  cat >&2 <<MSG
prereqs: the Pub/Sub emulator is missing ($emulator).
Install it from Google's apt repository:
  https://cloud.google.com/sdk/docs/install#deb  then  sudo apt-get install google-cloud-cli-pubsub-emulator
or with an existing gcloud:  gcloud components install pubsub-emulator
and set PUBSUB_EMULATOR_BIN if it lives elsewhere.
MSG
  exit 1
fi

# Prometheus and promtool check the chart's alert rules (charts/tests/test_chart_alerts.py).
# The tests start their own Prometheus: Debian's service is kept from starting (policy-rc.d,
# which invoke-rc.d and deb-systemd-invoke honour) and from starting at boot.
if [[ "$want_python" == python ]] && ! { command -v prometheus && command -v promtool; } >/dev/null; then
  policy=/usr/sbin/policy-rc.d
  if [[ $(id -u) -eq 0 && ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt_install prometheus
  if [[ -d /run/systemd/system ]]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
fi

# Python tools for the chart and manifest checks.
if [[ "$want_python" == python ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  stamp="$VENV/.requirements.stamp"
  if [[ ! -f "$stamp" ]] || ! cmp -s "$repo/scripts/requirements.txt" "$stamp"; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -r "$repo/scripts/requirements.txt"
    cp "$repo/scripts/requirements.txt" "$stamp"
  fi
fi
