#!/usr/bin/env bash
# End-to-end test on a real kind cluster (needs Docker, kind, helm, kubectl and python3).
# CI does not run it: the CI machines have no Docker. `make e2e` builds the images, creates
# or reuses the cluster (scripts/kind-up.sh) and then runs this script, which:
#
#   1. installs the chart (CRDs, operator) and waits for the operator;
#   2. applies examples/dev/ (PostgreSQL, Pub/Sub emulator, Secret, the migrate Job creating
#      the outbox and inbox tables, the Job creating the topic and its two subscriptions);
#   3. applies examples/outboxrelay.yaml and examples/inboxrelay.yaml and waits for both to be
#      Ready (`kubectl get outboxrelays`, `kubectl get inboxrelays`, `kubectl get outbox`);
#   4. writes E2E_ROWS rows into the outbox table, reads them all from the subscription
#      orders-sub and finds them all in the inbox table (through orders-inbox), checking the
#      per-ordering-key order of both;
#   5. deletes the pod holding the relay's Lease, writes E2E_ROWS more rows, sees another pod
#      take the Lease and every row arrive on the subscription and in the inbox, and the
#      outbox table drain;
#   6. deletes the relay and the inbox and waits until their Deployments, ServiceAccounts,
#      Roles, RoleBindings, PodDisruptionBudgets and pods are gone.
#
# Every wait has a deadline; polling loops sleep between checks, never as synchronisation.
# Environment: KIND_CLUSTER (default outbox), OPERATOR_NAMESPACE (outbox-system),
# E2E_ROWS (1000), E2E_KEEP=1 keeps the relay and the client pod for inspection,
# HELM, KIND, WORKER_IMAGE / OPERATOR_IMAGE (as for scripts/kind-up.sh).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

HELM="${HELM:-helm}"
KIND="${KIND:-kind}"
cluster="${KIND_CLUSTER:-outbox}"
context="kind-$cluster"
op_ns="${OPERATOR_NAMESPACE:-outbox-system}"
ns=outbox-dev
relay=orders
inbox=orders
project=local-dev-project
subscription=orders-sub
rows="${E2E_ROWS:-1000}"
run_id="$(date +%s)-$$"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
worker_image="${WORKER_IMAGE:-ghcr.io/outbox-dev/outbox-worker:$version}"
operator_image="${OPERATOR_IMAGE:-ghcr.io/outbox-dev/outbox-operator:$version}"
client=e2e-client
client_image=docker.io/curlimages/curl:8.11.1
work="$(mktemp -d)"
seen="$work/seen.txt" # one received payload per line (duplicates kept)
: >"$seen"

k() { kubectl --context "$context" "$@"; }
kn() { kubectl --context "$context" -n "$ns" "$@"; }
step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
started=$SECONDS

# The pods of each: an OutboxRelay and an InboxRelay of one name share the instance label.
relay_pods="app.kubernetes.io/name=outbox-worker,app.kubernetes.io/instance=$relay"
inbox_pods="app.kubernetes.io/name=outbox-inbox-worker,app.kubernetes.io/instance=$inbox"
inbox_objects="$inbox-inbox" # the InboxRelay's Deployment, Lease, ServiceAccount, ...

diagnostics() {
  echo "---- diagnostics ----" >&2
  k get nodes -o wide >&2 || true
  k -n "$op_ns" get pods -o wide >&2 || true
  kn get outboxrelays,inboxrelays,deployments,pods,jobs,leases,pdb -o wide >&2 || true
  kn describe outboxrelay "$relay" >&2 || true
  kn describe inboxrelay "$inbox" >&2 || true
  kn get events --sort-by=.lastTimestamp 2>/dev/null | tail -n 30 >&2 || true
  echo "---- operator logs ----" >&2
  k -n "$op_ns" logs -l app.kubernetes.io/name=outbox-operator --tail=40 --prefix >&2 || true
  echo "---- relay logs ----" >&2
  kn logs -l "$relay_pods" --tail=40 --prefix >&2 || true
  echo "---- inbox logs ----" >&2
  kn logs -l "$inbox_pods" --tail=40 --prefix >&2 || true
}
fail() {
  echo "e2e: FAIL: $*" >&2
  diagnostics
  exit 1
}
cleanup() {
  if [[ "${E2E_KEEP:-0}" != 1 ]]; then
    kn delete pod "$client" --ignore-not-found --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 2 s until it succeeds.
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@"; do
    ((SECONDS < deadline)) || fail "timed out after ${timeout}s waiting for: $what"
    sleep 2
  done
}

psql_dev() {
  kn exec deploy/postgres -c postgres -- \
    psql -X -q -t -A -v ON_ERROR_STOP=1 -U outbox -d outbox -c "$1"
}

insert_rows() { # insert_rows FIRST LAST
  psql_dev "INSERT INTO outbox (payload, ordering_key)
            SELECT convert_to('e2e-$run_id-' || g, 'UTF8'), 'k' || (g % 10)
            FROM generate_series($1, $2) g" >/dev/null
}

# Pulls everything the subscription holds right now (acknowledging it) into $seen.
drain() {
  local body
  while :; do
    body="$(kn exec "$client" -- curl -fsS -X POST -H 'Content-Type: application/json' \
      -d '{"maxMessages": 1000, "returnImmediately": true}' \
      "http://pubsub-emulator.$ns.svc:8085/v1/projects/$project/subscriptions/$subscription:pull")" ||
      return 1
    local parsed
    parsed="$(python3 -c '
import base64, json, sys
msgs = json.loads(sys.stdin.read() or "{}").get("receivedMessages", [])
with open(sys.argv[1], "a") as seen:
    for m in msgs:
        seen.write(base64.b64decode(m["message"].get("data", "")).decode() + "\n")
print(json.dumps({"ackIds": [m["ackId"] for m in msgs]}))
' "$seen" <<<"$body")"
    [[ "$parsed" == '{"ackIds": []}' ]] && return 0
    kn exec -i "$client" -- curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' \
      --data-binary @- \
      "http://pubsub-emulator.$ns.svc:8085/v1/projects/$project/subscriptions/$subscription:acknowledge" \
      <<<"$parsed" || return 1
  done
}

# received FIRST LAST: succeeds when every payload e2e-<run>-FIRST..LAST has been received.
received() {
  drain || return 1
  local got
  got="$(python3 -c '
import sys
run, first, last = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prefix = "e2e-" + run + "-"
got = {int(l[len(prefix):]) for l in open(sys.argv[1]).read().split() if l.startswith(prefix)}
print(len(got & set(range(first, last + 1))))
' "$seen" "$run_id" "$1" "$2")"
  echo "    received $got of $(($2 - $1 + 1)) (rows $1..$2)"
  [[ "$got" -eq $(($2 - $1 + 1)) ]]
}

# Per ordering key, the first delivery of each row must follow insertion order (in FILE,
# one payload a line, default: what the subscription delivered).
check_order() { # check_order FIRST LAST [FILE]
  python3 -c '
import sys
run, first, last = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
prefix = "e2e-" + run + "-"
last_by_key, seen, bad = {}, set(), []
for line in open(sys.argv[1]).read().split():
    if not line.startswith(prefix):
        continue
    g = int(line[len(prefix):])
    if g in seen or not first <= g <= last:
        continue
    seen.add(g)
    key = g % 10
    if g < last_by_key.get(key, 0):
        bad.append((key, last_by_key[key], g))
    last_by_key[key] = g
if bad:
    print("out of order (key, previous, row):", bad[:10])
    sys.exit(1)
' "${3:-$seen}" "$run_id" "$1" "$2"
}

# The payloads of this run in the inbox table, in id order (receive order, which is the
# processing order within an ordering key).
inbox_payloads() {
  psql_dev "SELECT convert_from(payload, 'UTF8') FROM inbox
            WHERE position(convert_to('e2e-$run_id-', 'UTF8') IN payload) = 1 ORDER BY id"
}

# in_inbox FIRST LAST: succeeds when the inbox table holds every row FIRST..LAST (once: the
# inbox stores each message id once).
in_inbox() {
  local got
  got="$(psql_dev "SELECT count(*) FROM inbox WHERE payload IN
                   (SELECT convert_to('e2e-$run_id-' || g, 'UTF8') FROM generate_series($1, $2) g)")" ||
    return 1
  echo "    inbox holds $got of $(($2 - $1 + 1)) (rows $1..$2)"
  [[ "$got" -eq $(($2 - $1 + 1)) ]]
}

check_inbox_order() { # check_inbox_order FIRST LAST
  inbox_payloads >"$work/inbox.txt" || return 1
  check_order "$1" "$2" "$work/inbox.txt"
}

# Plays the application: marks this run's inbox rows processed, as a consumer's transaction
# would. Rows left unprocessed would turn the InboxRelay's Ready False (Stalled) after
# stalledAfter.
process_inbox() {
  psql_dev "UPDATE inbox SET processed_at = clock_timestamp()
            WHERE processed_at IS NULL AND position(convert_to('e2e-$run_id-', 'UTF8') IN payload) = 1" >/dev/null
}

holder() { kn get lease "$relay" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
relay_pod_exists() { # a pod of the relay's Deployment, not being deleted
  [[ -n "$1" ]] && [[ "$(kn get pod "$1" --ignore-not-found \
    -o jsonpath='{.metadata.labels.app\.kubernetes\.io/name}/{.metadata.labels.app\.kubernetes\.io/instance}/{.metadata.deletionTimestamp}' 2>/dev/null)" == "outbox-worker/$relay/" ]]
}
new_leader() { # new_leader OLD: a live relay pod other than OLD holds the Lease
  local h
  h="$(holder)" || return 1
  [[ -n "$h" && "$h" != "$1" ]] && relay_pod_exists "$h"
}
status_leader_is() { [[ "$(kn get outboxrelay "$relay" -o jsonpath='{.status.leader}')" == "$1" ]]; }
inbox_holder() { kn get lease "$inbox_objects" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
inbox_leader() { # a live pod of the inbox's Deployment holds its Lease
  local h
  h="$(inbox_holder)" || return 1
  [[ -n "$h" ]] && [[ "$(kn get pod "$h" --ignore-not-found \
    -o jsonpath='{.metadata.labels.app\.kubernetes\.io/name}/{.metadata.labels.app\.kubernetes\.io/instance}/{.metadata.deletionTimestamp}' 2>/dev/null)" == "outbox-inbox-worker/$inbox/" ]]
}
owned_objects() { # owned_objects NAME SELECTOR: what is left of a relay's objects and pods
  kn get deployment/"$1" serviceaccount/"$1" role.rbac.authorization.k8s.io/"$1" \
    rolebinding.rbac.authorization.k8s.io/"$1" poddisruptionbudget.policy/"$1" \
    --ignore-not-found -o name
  kn get pods -l "$2" -o name
}
relay_objects_gone() { [[ -z "$(owned_objects "$relay" "$relay_pods")$(owned_objects "$inbox_objects" "$inbox_pods")" ]]; }
# `kubectl get` of the InboxRelay by its plural, its short name and the `outbox` category.
inboxrelay_listed() {
  [[ "$(kn get inboxrelays "$inbox" -o name)" == "inboxrelay.outbox.dev/$inbox" ]] &&
    [[ "$(kn get ibr "$inbox" -o name)" == "inboxrelay.outbox.dev/$inbox" ]] &&
    kn get outbox -o name | grep -qx "inboxrelay.outbox.dev/$inbox" &&
    kn get outbox -o name | grep -qx "outboxrelay.outbox.dev/$relay"
}
outbox_empty() { [[ "$(psql_dev 'SELECT count(*) FROM outbox')" == 0 ]]; }

# ---------------------------------------------------------------------------------------
step "checking tools and the cluster"
for tool in kubectl "$HELM" "$KIND" python3; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (see README.md, Quickstart on kind)"
done
"$KIND" get clusters 2>/dev/null | grep -qx "$cluster" ||
  fail "no kind cluster '$cluster'; run: make kind-up"
k get nodes >/dev/null || fail "cannot reach the cluster with context $context"

step "installing the chart (CRDs + operator) into $op_ns"
"$HELM" --kube-context "$context" upgrade --install outbox-operator charts/outbox-operator \
  --namespace "$op_ns" --create-namespace \
  --set image.repository="${operator_image%:*}" --set image.tag="${operator_image##*:}" \
  --set workerImage.repository="${worker_image%:*}" --set workerImage.tag="${worker_image##*:}" \
  --wait --timeout 5m
# Helm installs crds/ only once; on a reused cluster bring the CRDs up to date.
k apply --server-side --force-conflicts -f crds/
k wait --for=condition=Established crd/outboxrelays.outbox.dev crd/inboxrelays.outbox.dev --timeout=60s
k -n "$op_ns" rollout status deployment/outbox-operator --timeout=300s
wait_until 60 "an operator replica holding the outbox-operator Lease" \
  bash -c "[[ -n \"\$(kubectl --context '$context' -n '$op_ns' get lease outbox-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null)\" ]]"

step "development dependencies (examples/dev/)"
k apply -f examples/dev/
kn rollout status deployment/postgres --timeout=600s
kn rollout status deployment/pubsub-emulator --timeout=900s
kn wait --for=condition=Complete job/pubsub-setup job/outbox-migrate --timeout=600s ||
  fail "the setup Jobs did not complete"

step "client pod for the emulator's REST API"
if ! kn get pod "$client" >/dev/null 2>&1; then
  kn run "$client" --image="$client_image" --restart=Never --labels=app.kubernetes.io/part-of=pubsub-outbox-dev \
    --overrides='{"apiVersion":"v1","spec":{"securityContext":{"runAsNonRoot":true,"runAsUser":100,"seccompProfile":{"type":"RuntimeDefault"}},"containers":[{"name":"'"$client"'","image":"'"$client_image"'","command":["sleep","86400"],"securityContext":{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]}}}]}}' \
    --command -- sleep 86400 >/dev/null
fi
kn wait --for=condition=Ready pod/"$client" --timeout=300s
drain || fail "cannot pull from the subscription"
: >"$seen" # forget whatever an earlier run left behind

step "applying examples/outboxrelay.yaml and examples/inboxrelay.yaml"
k apply -f examples/outboxrelay.yaml -f examples/inboxrelay.yaml
kn wait outboxrelay/"$relay" --for=condition=Ready --timeout=600s ||
  fail "relay did not become Ready"
kn wait inboxrelay/"$inbox" --for=condition=Ready --timeout=600s ||
  fail "inbox did not become Ready"
kn rollout status deployment/"$relay" --timeout=300s
kn rollout status deployment/"$inbox_objects" --timeout=300s
kn get outboxrelays
kn get inboxrelays
inboxrelay_listed || fail "kubectl get inboxrelays / ibr / outbox does not list the InboxRelay $inbox"
wait_until 60 "a relay pod holding the Lease $relay" new_leader ""
wait_until 120 "status.leader naming the Lease holder" status_leader_is "$(holder)"
wait_until 120 "an inbox pod holding the Lease $inbox_objects" inbox_leader

step "writing rows 1..$rows and reading them from $subscription and the inbox table"
insert_rows 1 "$rows"
wait_until 300 "rows 1..$rows on the subscription" received 1 "$rows"
check_order 1 "$rows" || fail "ordering-key order broken"
wait_until 120 "the outbox table to drain" outbox_empty
wait_until 300 "rows 1..$rows in the inbox table" in_inbox 1 "$rows"
check_inbox_order 1 "$rows" || fail "ordering-key order broken in the inbox table"
process_inbox

step "failover: deleting the leader pod"
old="$(holder)"
relay_pod_exists "$old" || fail "Lease holder '$old' is not a pod of the relay"
nodes="$(kn get pods -l "$relay_pods" -o jsonpath='{range .items[*]}{.metadata.name}={.spec.nodeName} {end}')"
echo "    leader $old; pods: $nodes"
kn delete pod "$old" --wait=false
insert_rows $((rows + 1)) $((2 * rows))
wait_until 120 "another pod taking the Lease from $old" new_leader "$old"
new="$(holder)"
echo "    new leader $new"
wait_until 300 "rows $((rows + 1))..$((2 * rows)) after the failover" received $((rows + 1)) $((2 * rows))
received 1 $((2 * rows)) || fail "rows lost across the failover"
wait_until 120 "the outbox table to drain" outbox_empty
wait_until 300 "rows 1..$((2 * rows)) in the inbox table after the failover" in_inbox 1 $((2 * rows))
check_inbox_order 1 $((2 * rows)) || fail "ordering-key order broken in the inbox table"
process_inbox
kn rollout status deployment/"$relay" --timeout=300s
kn wait outboxrelay/"$relay" --for=condition=Ready --timeout=300s
wait_until 120 "status.leader to name the new leader" status_leader_is "$(holder)"
kn wait inboxrelay/"$inbox" --for=condition=Ready --timeout=300s ||
  fail "inbox is not Ready after its rows were processed"
kn get outboxrelays,inboxrelays
dups="$(python3 -c 'import sys; l=[x for x in open(sys.argv[1]).read().split() if x.startswith("e2e-"+sys.argv[2]+"-")]; print(len(l)-len(set(l)))' "$seen" "$run_id")"
echo "    $((2 * rows)) rows delivered, $dups duplicate deliveries (at-least-once)"

if [[ "${E2E_KEEP:-0}" == 1 ]]; then
  step "E2E_KEEP=1: leaving the relay and the inbox in place"
else
  step "deleting the relay and the inbox; their objects must go"
  kn delete outboxrelay/"$relay" inboxrelay/"$inbox" --wait=true --timeout=120s
  wait_until 180 "the Deployments/ServiceAccounts/Roles/RoleBindings/PDBs/pods of both to be deleted" relay_objects_gone
fi

step "e2e passed in $((SECONDS - started))s"
