#!/usr/bin/env bash
# Shard takeover cost of stage `services` with N stored events: one inventory node started
# alone on a fresh PostgreSQL database holding N events (seeded with SQL, 100 seats each, none
# sold) takes all 64 shards, as a survivor takes a dead node's. Prints the time from its launch
# until it has taken every shard (its log's `took a shard` lines: logged once a shard is
# adopted, its pending purchases resolved), its resident memory then, and how many leases it
# lost meanwhile (a lease runs out when adopting blocks its renewal).
#
#   benches/takeover.sh BINARY EVENTS [PORT]     (POSTGRES_URL, default postgres://postgres@127.0.0.1:5432)
set -euo pipefail
bin=${1:?usage: benches/takeover.sh BINARY EVENTS [PORT]}
events=${2:?usage: benches/takeover.sh BINARY EVENTS [PORT]}
port=${3:-18095}
pg=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}
name=perf_takeover_$$
db=$pg/$name
node=
cleanup() {
    if [ -n "$node" ]; then kill -INT "$node" 2>/dev/null || true; wait "$node" 2>/dev/null || true; fi
    psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null 2>&1 || true
    rm -f "/tmp/$name.log"
}
trap cleanup EXIT
"$bin" migrate --db "$db" >/dev/null 2>&1
psql "$db" -qc "INSERT INTO events (name, venue, date, total_tickets, available_tickets, price_cents, created_at)
  SELECT 'Event ' || i, 'Hall', '2026-12-31T20:00:00.000Z', 100, 100, 5000, '2026-11-01T00:00:00.000Z'
  FROM generate_series(1, $events) AS i"
t0=$(date +%s%N)
"$bin" node inventory --db "$db" --admin-token takeover-bench --bind "127.0.0.1:$port" \
    --node-id inv-bench >"/tmp/$name.log" 2>&1 &
node=$!
held=0
deadline=$(( $(date +%s) + 300 ))
while [ "$held" -lt 64 ]; do
    if [ "$(date +%s)" -gt "$deadline" ]; then
        echo "events=$events gave up after 300 s holding $held of 64 shards" >&2
        exit 1
    fi
    sleep 0.05
    held=$(grep -c "took a shard" "/tmp/$name.log" || true)
done
t1=$(date +%s%N)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$node/status")
lost=$(grep -c "lost a shard lease" "/tmp/$name.log" || true)
printf 'events=%s all_64_shards_ms=%d rss_kb=%s leases_lost=%s\n' "$events" $(((t1 - t0) / 1000000)) "$rss" "$lost"
