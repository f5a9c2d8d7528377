#!/usr/bin/env bash
# Restart cost of `ticketflow serve` (stage actor, SQLite) with N stored events: the time from
# launch until /health answers, the resident memory then, and the peak (GNU time). The events
# are seeded straight into the database with SQL (each 100 seats, none sold), then the server
# is started on it, asked /health until it answers, and sent one purchase (the first use of an
# event: with virtual actors, its activation), then stopped with SIGINT.
#
#   benches/restart.sh BINARY EVENTS [PORT]      e.g. benches/restart.sh target/release/ticketflow 100000
set -euo pipefail
bin=${1:?usage: benches/restart.sh BINARY EVENTS [PORT]}
events=${2:?usage: benches/restart.sh BINARY EVENTS [PORT]}
port=${3:-18090}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
db=$dir/restart.db
"$bin" migrate --db "$db" >/dev/null 2>&1
sqlite3 "$db" "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $events)
  INSERT INTO events (name, venue, date, total_tickets, available_tickets, price_cents, created_at)
  SELECT 'Event ' || i, 'Hall', '2026-12-31T20:00:00.000Z', 100, 100, 5000, '2026-11-01T00:00:00.000Z' FROM n;"
# The first start of a binary may migrate the database; one start and stop first, untimed.
"$bin" serve --db "$db" --bind "127.0.0.1:$port" >"$dir/warm.log" 2>&1 &
warm=$!
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.01; done
kill -INT "$warm"; wait "$warm" || true

t0=$(date +%s%N)
/usr/bin/time -v -o "$dir/time.txt" "$bin" serve --db "$db" --bind "127.0.0.1:$port" \
    --payment-latency 0 --payment-failure-rate 0 >"$dir/serve.log" 2>&1 &
timer=$!
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.005; done
t1=$(date +%s%N)
server=$(pgrep -P "$timer")
rss_ready=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
t2=$(date +%s%N)
status=$(curl -s -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
    -d "{\"eventId\": $events, \"userId\": \"restart-probe\"}" \
    "http://127.0.0.1:$port/api/v1/tickets/purchase")
t3=$(date +%s%N)
kill -INT "$server"; wait "$timer" || true
peak=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$dir/time.txt")
printf 'events=%s ready_ms=%d rss_ready_kb=%s first_purchase=%s first_purchase_ms=%d peak_rss_kb=%s\n' \
    "$events" $(((t1 - t0) / 1000000)) "$rss_ready" "$status" $(((t3 - t2) / 1000000)) "$peak"
