#!/usr/bin/env bash
# bench.sh: the short benchmark run behind `make bench` (under 5 minutes on
# 2 cores). It builds the binaries, runs the Go benchmarks of the hot paths,
# then for each load scenario starts a fresh mediator on a temporary data
# directory with random loopback ports, runs a small d2m-load scenario
# against it and stops it. Results (JSON, SVG plots, logs) go to $BENCH_OUT
# (default: a new /tmp/d2m-bench.* directory).
#
#   cmd/d2m-load/bench.sh                 # everything
#   GOBENCH=0 cmd/d2m-load/bench.sh       # load scenarios only
#   SCENARIOS="reflect storm" cmd/d2m-load/bench.sh
#   FULL=1 cmd/d2m-load/bench.sh          # the sizes of BENCHMARKS.md (~6 min)
#
# Only processes this script started are stopped, by PID.
set -euo pipefail

cd "$(dirname "$0")/../.."
GO=${GO:-go}
OUT=${BENCH_OUT:-$(mktemp -d /tmp/d2m-bench.XXXXXX)}
GOBENCH=${GOBENCH:-1}
FULL=${FULL:-0}
SCENARIOS=${SCENARIOS:-"reflect reflect-rate reflect-rate-small idle handshake storm csp"}
BENCHTIME=1s
[ "$FULL" = 1 ] && BENCHTIME=3s
mkdir -p "$OUT/bin"
echo "== output in $OUT"
echo "== machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $($GO version), load $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== build"
$GO build -o "$OUT/bin/" ./cmd/mediator ./cmd/d2m-load
MEDIATOR=$OUT/bin/mediator
LOAD=$OUT/bin/d2m-load

if [ "$GOBENCH" != 0 ]; then
	echo "== Go benchmarks (d2m, d2d, chatproxy, reflection, WebSocket bounds)"
	$GO test -run '^$' -bench . -benchmem -benchtime=$BENCHTIME ./d2m/ ./d2d/ ./chatproxy/ ./reflection/ 2>&1 | tee "$OUT/gobench.txt"
	$GO test -run '^$' -bench Bound -benchtime=$BENCHTIME ./mediator/ 2>&1 | tee -a "$OUT/gobench.txt"
fi

SERVER_PID=
stop_server() {
	if [ -n "$SERVER_PID" ]; then
		kill -TERM "$SERVER_PID" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$SERVER_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$SERVER_PID" 2>/dev/null || true
		wait "$SERVER_PID" 2>/dev/null || true
		SERVER_PID=
	fi
}
trap stop_server EXIT

# start_server NAME: a fresh mediator; sets URL, ADMIN, DATA, CHATKEY.
# The log level is info because the startup line ("mediator listening",
# with the random ports) is an info line; per-connection info lines cost
# the server a little.
start_server() {
	DATA=$OUT/data-$1
	local log=$OUT/server-$1.log
	rm -rf "$DATA"
	"$MEDIATOR" serve --data "$DATA" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
		--log-format json --log-level info 2>"$log" &
	SERVER_PID=$!
	URL= ADMIN= CHATKEY=
	for _ in $(seq 1 100); do
		local line
		line=$(grep -m1 '"mediator listening"' "$log" || true)
		if [ -n "$line" ]; then
			URL=$(echo "$line" | sed -n 's/.*"devices":"\([^"]*\)".*/\1/p')
			ADMIN=$(echo "$line" | sed -n 's/.*"admin":"\([^"]*\)".*/\1/p')
			CHATKEY=$(grep -m1 '"public_key"' "$log" | sed -n 's/.*"public_key":"\([0-9a-f]*\)".*/\1/p')
			break
		fi
		kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log"; echo "mediator exited"; exit 1; }
		sleep 0.1
	done
	[ -n "$URL" ] || { cat "$log"; echo "mediator did not start"; exit 1; }
	URL=${URL%/}
	ADMIN=${ADMIN%/}
}

# load NAME ARGS...: d2m-load against the current server, JSON + SVG kept.
load() {
	local name=$1
	shift
	echo "== $name: d2m-load $*"
	"$LOAD" --url "$URL" --server-pid "$SERVER_PID" --admin "$ADMIN" --admin-token-file "$DATA/admin.token" \
		--json --plot "$OUT/$name.svg" "$@" >"$OUT/$name.json"
}

for s in $SCENARIOS; do
	start_server "$s"
	if [ "$FULL" = 1 ]; then
		case $s in
		reflect) load reflect --scenario reflect --groups 1000 --devices 3 --size 100 --pipeline 8 --duration 15s ;;
		reflect-rate) load reflect-rate --scenario reflect --groups 1000 --devices 3 --size 100 --rate 5000 --duration 15s ;;
		reflect-rate-small) load reflect-rate-small --scenario reflect --groups 100 --devices 3 --size 100 --rate 5000 --duration 15s ;;
		idle) load idle --scenario idle --devices 5000 --duration 5s ;;
		handshake) load handshake --scenario handshake --concurrency 64 --duration 15s ;;
		storm) load storm --scenario storm --devices 8000 --queued 10 --duration 60s ;;
		csp) load csp --scenario csp --devices 100 --duration 15s --chat-server-key "$CHATKEY" ;;
		*) echo "unknown scenario $s"; exit 2 ;;
		esac
	else
		case $s in
		reflect) load reflect --scenario reflect --groups 300 --devices 3 --size 100 --pipeline 8 --duration 8s ;;
		reflect-rate) load reflect-rate --scenario reflect --groups 300 --devices 3 --size 100 --rate 5000 --duration 8s ;;
		reflect-rate-small) load reflect-rate-small --scenario reflect --groups 100 --devices 3 --size 100 --rate 5000 --duration 8s ;;
		idle) load idle --scenario idle --devices 2000 --duration 3s ;;
		handshake) load handshake --scenario handshake --concurrency 64 --duration 8s ;;
		storm) load storm --scenario storm --devices 2000 --queued 10 --duration 30s ;;
		csp) load csp --scenario csp --devices 100 --duration 8s --chat-server-key "$CHATKEY" ;;
		*) echo "unknown scenario $s"; exit 2 ;;
		esac
	fi
	stop_server
done
echo "== done: results in $OUT"
