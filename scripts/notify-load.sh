#!/usr/bin/env bash
# The NOTIFY scenario of issue 11, as a user would run it: pgbench commits
# one-row transactions into the outbox at a fixed rate while the relay runs,
# and every second this samples pg_notification_queue_usage() and the
# listening backends waiting to write to their client (ClientWrite). A relay
# that stops reading its notifications shows as a growing queue.
#
#   scripts/notify-load.sh [RATE=2000] [SECONDS=600]
#
# Needs the release build (`cargo build --release -p worker`), PostgreSQL's
# server binaries with pgbench and the Pub/Sub emulator (scripts/prereqs.sh).
# Exit status 0 when the queue never held more than 8 pages (64 kB; see
# docs/soak.md for why a few pages are normal) and no listener waited.
set -euo pipefail

rate=${1:-2000}
seconds=${2:-600}
root=$(cd "$(dirname "$0")/.." && pwd)
worker=${OUTBOX_WORKER_BIN:-$root/target/release/outbox-worker}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)}
emulator=${PUBSUB_EMULATOR_BIN:-/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator}
[[ -x $worker ]] || { echo "no $worker: run cargo build --release -p worker" >&2; exit 2; }

dir=$(mktemp -d /tmp/notify-load.XXXXXX)
chmod 755 "$dir"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
emu_port=$(free_port)
as_postgres=()
[[ $(id -u) == 0 ]] && as_postgres=(runuser -u postgres --) && chown postgres "$dir"

pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    "${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

"${as_postgres[@]}" "$pg_bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
"${as_postgres[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w start -o \
    "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c fsync=off \
     -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=256MB -c max_connections=100" >/dev/null
psql=(psql -X -q -At -h 127.0.0.1 -p "$pg_port" -U postgres)
"${psql[@]}" -c "CREATE DATABASE app"
url="postgres://postgres@127.0.0.1:$pg_port/app"

JAVA_TOOL_OPTIONS="-Xss1m -XX:+UseParallelGC -Xms1g -Xmx4g" \
    "$emulator" --host=127.0.0.1 --port="$emu_port" >"$dir/emulator.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$emu_port/" >/dev/null && break; sleep 0.5; done
curl -sf -X PUT "http://127.0.0.1:$emu_port/v1/projects/load/topics/orders" >/dev/null

health=127.0.0.1:$(free_port)
DATABASE_URL=$url PUBSUB_TOPIC=projects/load/topics/orders PUBSUB_EMULATOR_HOST=127.0.0.1:$emu_port \
    HEALTH_ADDR=$health LEADER_ELECTION=postgres MIGRATE=true \
    "$worker" relay >"$dir/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do curl -sf "http://$health/readyz" >/dev/null && break; sleep 0.5; done
curl -sf "http://$health/readyz" >/dev/null || { echo "the relay did not get ready:" >&2; tail "$dir/relay.log" >&2; exit 1; }

cat >"$dir/tx.sql" <<'SQL'
INSERT INTO outbox (payload, ordering_key) VALUES ('\x7b22616d6f756e74223a2034327d', 'account-' || (random() * 200)::int);
SQL
echo "pgbench: $rate one-row transactions/s into the outbox for ${seconds}s, the relay running"
pgbench -n -h 127.0.0.1 -p "$pg_port" -U postgres -c 8 -j 2 -R "$rate" -T "$seconds" -f "$dir/tx.sql" app \
    >"$dir/pgbench.log" 2>&1 &
bench=$!

samples=$dir/samples
start=$SECONDS
while kill -0 "$bench" 2>/dev/null; do
    sleep 1
    "${psql[@]}" -F ' ' -d app -c \
        "SELECT pg_notification_queue_usage(),
                (SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite' AND query LIKE 'LISTEN%'),
                COALESCE((SELECT EXTRACT(EPOCH FROM clock_timestamp() - created_at) FROM outbox ORDER BY id LIMIT 1), 0)" \
        >>"$samples" || true
    if (((SECONDS - start) % 30 == 0)); then
        echo "[$((SECONDS - start))s] queue usage, listeners in ClientWrite, relay lag (s): $(tail -n1 "$samples")"
    fi
done
wait "$bench" || { cat "$dir/pgbench.log" >&2; exit 1; }
grep -E "^tps|number of transactions actually processed" "$dir/pgbench.log"
final=$("${psql[@]}" -d app -c "SELECT pg_notification_queue_usage()")
# One queue page is 1/1,048,576 of the queue (8 kB of 8 GB).
awk -v final="$final" '
    { n++; if ($1 > usage) usage = $1; if ($2 > 0) blocked++; if ($3 > lag) lag = $3 }
    END {
        printf "samples %d; NOTIFY queue max %g (%d pages of 8 kB), at the end %g; listener in ClientWrite in %d samples; relay lag at most %.2fs\n",
            n, usage, usage * 1048576 + 0.5, final, blocked, lag
        ok = usage * 1048576 <= 8 && final * 1048576 <= 8 && blocked == 0
        print ok ? "PASS" : "FAIL"
        exit ok ? 0 : 1
    }' "$samples"
