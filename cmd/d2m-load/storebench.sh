#!/usr/bin/env bash
# storebench.sh: the reflection-store figures of BENCHMARKS.md ("Reflection
# store v2"). For each run it starts a fresh mediator from $BIN on a new
# temporary data directory, runs d2m-load's reflect scenario (1000 groups x
# 3 devices, 100 B envelopes) and prints one line: ReflectAck p50/p99/p99.9,
# throughput, server CPU per reflect, commits per reflect and bytes written
# per reflect (server /proc/PID/io write_bytes; CPU and bytes over the
# steady part of the measured phase, see below). JSON goes to $OUT.
#
#   BIN=/tmp/sv2bin cmd/d2m-load/storebench.sh             # rate 1000, 5000 and pipeline 8
#   RUNS="rate:1000" BIN=/tmp/sv2bin cmd/d2m-load/storebench.sh
#   CURVE=1 LABEL=v2 BIN=/tmp/sv2bin cmd/d2m-load/storebench.sh
#       latency against offered rate (1k, 2k, 5k, 10k, 20k/s and
#       --pipeline 8) for 100 and 1000 groups; draws $OUT/curve.svg with
#       `d2m-load curve` (several outputs can be drawn together the same way)
#
#   PG_DSN_BASE=postgres://postgres@127.0.0.1:PORT BIN=… cmd/d2m-load/storebench.sh
#       the same runs with the state in PostgreSQL: a fresh database per run
#       (created with psql), `serve --store $PG_DSN_BASE/<db>`; bytes/reflect
#       then counts only the mediator's own writes (none), not the database's
#
# Only the server this script started is stopped, by PID.
set -euo pipefail
BIN=${BIN:?BIN=directory with mediator and d2m-load}
OUT=${OUT:-$(mktemp -d /tmp/storebench.XXXXXX)}
mkdir -p "$OUT"
RUNS=${RUNS:-"rate:1000 rate:5000 pipeline:8"}
DURATION=${DURATION:-15s}
GROUPS_N=${GROUPS_N:-1000}
PORT=${PORT:-18765}
SERVER_PID=
stop_server() {
	if [ -n "$SERVER_PID" ]; then
		kill -TERM "$SERVER_PID" 2>/dev/null || true
		for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$SERVER_PID" 2>/dev/null || true
		wait "$SERVER_PID" 2>/dev/null || true
		SERVER_PID=
	fi
}
trap stop_server EXIT
if [ "${CURVE:-0}" = 1 ]; then
	specs=()
	for g in 100 1000; do
		mkdir -p "$OUT/g$g"
		OUT="$OUT/g$g" GROUPS_N=$g CURVE=0 RUNS="rate:1000 rate:2000 rate:5000 rate:10000 rate:20000 pipeline:8" "$0"
		specs+=("${LABEL:-} $g groups=$(ls "$OUT/g$g"/*.json | paste -sd,)")
	done
	"$BIN/d2m-load" curve "$OUT/curve.svg" "${specs[@]}"
	exit 0
fi
wbytes() { awk '/^write_bytes/ {print $2}' /proc/$1/io; }
cpu() { awk '{print $14 + $15}' /proc/$1/stat; } # utime + stime, clock ticks (100/s)
echo "# bin=$BIN out=$OUT load=$(cut -d' ' -f1-3 /proc/loadavg)"
for run in $RUNS; do
	kind=${run%%:*} val=${run#*:}
	DATA=$(mktemp -d /tmp/storebench-data.XXXXXX)
	store=()
	if [ -n "${PG_DSN_BASE:-}" ]; then
		db="bench_$(date +%s%N)"
		psql -X -q "$PG_DSN_BASE/postgres" -c "CREATE DATABASE $db" >/dev/null
		store=(--store "$PG_DSN_BASE/$db?sslmode=disable")
	fi
	"$BIN/mediator" serve "${store[@]}" --data "$DATA" --listen 127.0.0.1:$PORT --admin-listen 127.0.0.1:$((PORT + 1)) \
		--log-format json --log-level info 2>"$OUT/server-$kind-$val.log" &
	SERVER_PID=$!
	for _ in $(seq 1 100); do grep -q '"mediator listening"' "$OUT/server-$kind-$val.log" && break; sleep 0.1; done
	args=(--scenario reflect --groups "$GROUPS_N" --devices 3 --size 100 --duration "$DURATION")
	if [ "$kind" = rate ]; then args+=(--rate "$val"); else args+=(--pipeline "$val"); fi
	# Disk writes and CPU are read between the load tool's first and last
	# progress line of the measured phase, so setup (3,000 handshakes and
	# slot writes) and the drain are not counted; reflects in between are
	# the sum of the per-second counts of those lines.
	"$BIN/d2m-load" --url "ws://127.0.0.1:$PORT" --server-pid "$SERVER_PID" --admin "http://127.0.0.1:$((PORT + 1))" \
		--admin-token-file "$DATA/admin.token" --json "${args[@]}" >"$OUT/$kind-$val.json" 2>"$OUT/$kind-$val.progress" &
	LOAD_PID=$!
	w0= c0= last=
	while kill -0 $LOAD_PID 2>/dev/null; do
		n=$(grep -c '^\[reflect\]' "$OUT/$kind-$val.progress" || true)
		if [ -z "$w0" ] && [ "$n" -ge 1 ]; then w0=$(wbytes $SERVER_PID) c0=$(cpu $SERVER_PID) n0=$n; fi
		if [ -n "$w0" ] && [ "$n" != "$last" ]; then w1=$(wbytes $SERVER_PID) c1=$(cpu $SERVER_PID) n1=$n; last=$n; fi
		sleep 0.05
	done
	wait $LOAD_PID
	steady=$(grep '^\[reflect\]' "$OUT/$kind-$val.progress" | sed -n "$((n0 + 1)),${n1}p" | sed 's/.*reflects=\([0-9]*\)\/s.*/\1/' | awk '{s += $1} END {print s + 0}')
	stop_server
	rm -rf "$DATA"
	python3 - "$OUT/$kind-$val.json" "$((w1 - w0))" "$kind=$val" "$steady" "$((c1 - c0))" "$((n1 - n0))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); wb = int(sys.argv[2]); steady = int(sys.argv[4]); ticks = int(sys.argv[5]); secs = int(sys.argv[6])
m = {x["name"]: x["value"] for x in r["metrics"]}
lat = r["latency_ms"]["ReflectAck"]
s = r.get("server") or {}
n = m["reflects acked (durable) in window"]
print(f"{sys.argv[3]:14} reflects={n:.0f} rate={n / r['elapsed_s']:.0f}/s ack p50={lat['p50_ms']} p99={lat['p99_ms']} p99.9={lat['p999_ms']} ms"
      f"  cpu/reflect={1e4 * ticks / max(steady, 1):.1f}us commits/reflect={s.get('commits', 0) / max(n, 1):.3f}"
      f"  bytes/reflect={wb / max(steady, 1):.0f} (steady {secs} s, {steady} reflects)  load={r['machine']['loadavg_start']}")
PY
done
