#!/usr/bin/env bash
# prodbench.sh: the production-shape run behind `make bench-prod`. It starts
# the stand-in chat server as its own process (cmd/chatstub, listening on
# CHAT_ADDRS loopback addresses 127.0.2.1 … 127.0.2.K, port CHAT_PORT), a
# mediator (`mediator serve`, bbolt in a new temporary directory,
# --chat-server 127.0.2.{group}:CHAT_PORT) and d2m-load --scenario mixed
# with --server-groups 1,…,K, so each device group's upstreams go to one of
# the K addresses. Results (JSON, plot, logs) go to $BENCH_OUT (default: a
# new /tmp/d2m-prod.* directory).
#
#   make bench-prod                                   # 5,000 devices, 3 min
#   DEVICES=50000 DURATION=10m make bench-prod        # the issue's target
#   DEVICES=10000 SHARDS=2 cmd/d2m-load/prodbench.sh  # two load processes
#
# Environment (defaults): DEVICES (5000), DURATION (3m, at most 10m),
# RAMP (1000 device setups/s), REPORT (1m), REFLECT_INTERVAL (60s),
# TX_INTERVAL (5m), GROUP_MIX (1:0.2,2:0.5,3:0.3), CHAT_ADDRS (one per
# 10,000 devices, at least 2), CHAT_PORT (5222), SOURCE_ADDRS (16), SHARDS
# (1), LOAD_ARGS (more d2m-load flags), BIN (./bin).
#
# Limits it checks before starting anything:
# - File descriptors: the mediator holds two per device (the device's
#   WebSocket and its chat-server upstream), the chat server and the load
#   tool one each. The script raises RLIMIT_NOFILE (soft and hard) for
#   everything it starts to 2 × DEVICES + 128 where the hard limit is
#   lower; that needs CAP_SYS_RESOURCE (root, unless a container dropped
#   it), else it says how many devices fit. Go programs lift their soft
#   limit to the hard one by themselves.
# - Ephemeral ports (net.ipv4.ip_local_port_range): the kernel picks a
#   local port per (source, destination) pair, so the devices' connections
#   are spread over SOURCE_ADDRS source addresses (d2m-load
#   --source-addrs) and the upstreams over CHAT_ADDRS destinations; neither
#   may need more than 80 % of the range. No sysctl is changed.
#
# Only processes this script started are stopped, by PID.
set -euo pipefail

cd "$(dirname "$0")/../.."
BIN=${BIN:-$PWD/bin}
OUT=${BENCH_OUT:-$(mktemp -d /tmp/d2m-prod.XXXXXX)}
DEVICES=${DEVICES:-5000}
DURATION=${DURATION:-3m}
RAMP=${RAMP:-1000}
REPORT=${REPORT:-1m}
REFLECT_INTERVAL=${REFLECT_INTERVAL:-60s}
TX_INTERVAL=${TX_INTERVAL:-5m}
GROUP_MIX=${GROUP_MIX:-1:0.2,2:0.5,3:0.3}
CHAT_ADDRS=${CHAT_ADDRS:-$(((DEVICES + 9999) / 10000 > 2 ? (DEVICES + 9999) / 10000 : 2))}
CHAT_PORT=${CHAT_PORT:-5222}
SOURCE_ADDRS=${SOURCE_ADDRS:-16}
SHARDS=${SHARDS:-1}
LOAD_ARGS=${LOAD_ARGS:-}
mkdir -p "$OUT"
for b in mediator chatstub d2m-load; do
	[ -x "$BIN/$b" ] || { echo "prodbench: $BIN/$b missing (make build)" >&2; exit 2; }
done

# --- limits ---
read -r port_lo port_hi </proc/sys/net/ipv4/ip_local_port_range
ports=$((port_hi - port_lo + 1))
per_chat=$(((DEVICES + CHAT_ADDRS - 1) / CHAT_ADDRS))
per_source=$(((DEVICES + SOURCE_ADDRS - 1) / SOURCE_ADDRS))
if [ $((per_chat * 10)) -gt $((ports * 8)) ] || [ $((per_source * 10)) -gt $((ports * 8)) ]; then
	echo "prodbench: $per_chat upstreams per chat-server address and $per_source devices per source address, but net.ipv4.ip_local_port_range has $ports ports ($port_lo-$port_hi): raise CHAT_ADDRS or SOURCE_ADDRS" >&2
	exit 2
fi
if [ "$CHAT_PORT" -ge "$port_lo" ] && [ "$CHAT_PORT" -le "$port_hi" ]; then
	echo "prodbench: CHAT_PORT $CHAT_PORT is inside the ephemeral range $port_lo-$port_hi" >&2
	exit 2
fi
# The mediator's own descriptors besides its connections: ~15 (database,
# listeners, admin scrapes).
NOFILE=$((2 * DEVICES + 128))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$NOFILE" ]; then
	if [ "$NOFILE" -gt "$(cat /proc/sys/fs/nr_open)" ]; then
		echo "prodbench: $NOFILE descriptors per process are over fs.nr_open ($(cat /proc/sys/fs/nr_open))" >&2
		exit 2
	fi
	if ! ulimit -Hn "$NOFILE" 2>/dev/null; then
		echo "prodbench: the mediator needs $NOFILE file descriptors (2 per device + 128) but the hard limit is $hard, which only a process with CAP_SYS_RESOURCE (root, unless a container dropped it) may raise: raise it for this shell first (limits.conf nofile, systemd LimitNOFILE=, docker --ulimit nofile=, prlimit --pid \$\$ --nofile=N:N from outside), or run at most $(((hard - 128) / 2)) devices" >&2
		exit 2
	fi
	echo "== raised the hard RLIMIT_NOFILE from $hard to $NOFILE for the processes of this run"
fi
ulimit -Sn "$(ulimit -Hn)"

echo "== output in $OUT"
echo "== machine: $(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, load $(cut -d' ' -f1-3 /proc/loadavg), nofile $(ulimit -n), ports $port_lo-$port_hi"
echo "== $DEVICES devices for $DURATION, ramp $RAMP/s, $CHAT_ADDRS chat-server addresses, $SOURCE_ADDRS source addresses, $SHARDS load process(es)"

PIDS=()
# stop_all stops the load processes, then the mediator, then the chat
# server (the reverse of the start order), each by PID.
stop_all() {
	local pid i
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		pid=${PIDS[i]}
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 150); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# --- chat server ---
listen= groups=
for i in $(seq 1 "$CHAT_ADDRS"); do
	listen+=${listen:+,}127.0.2.$i:$CHAT_PORT
	groups+=${groups:+,}$i
done
"$BIN/chatstub" --listen "$listen" --key-file "$OUT/chatstub.key" --log-format json --log-level warn \
	>"$OUT/chatstub.out" 2>"$OUT/chatstub.log" &
CHAT_PID=$!
PIDS+=("$CHAT_PID")
CHATKEY=
for _ in $(seq 1 100); do
	CHATKEY=$(sed -n 's/^public key: \([0-9a-f]*\)$/\1/p' "$OUT/chatstub.out")
	[ -n "$CHATKEY" ] && break
	kill -0 "$CHAT_PID" 2>/dev/null || { cat "$OUT/chatstub.log"; echo "chatstub exited"; exit 1; }
	sleep 0.1
done
[ -n "$CHATKEY" ] || { cat "$OUT/chatstub.log"; echo "chatstub did not start"; exit 1; }

# --- mediator ---
DATA=$OUT/data
"$BIN/mediator" serve --data "$DATA" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
	--chat-server "127.0.2.{group}:$CHAT_PORT" --log-format json --log-level info 2>"$OUT/server.log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
URL= ADMIN=
for _ in $(seq 1 100); do
	line=$(grep -m1 '"mediator listening"' "$OUT/server.log" || true)
	if [ -n "$line" ]; then
		URL=$(echo "$line" | sed -n 's/.*"devices":"\([^"]*\)".*/\1/p')
		ADMIN=$(echo "$line" | sed -n 's/.*"admin":"\([^"]*\)".*/\1/p')
		break
	fi
	kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/server.log"; echo "mediator exited"; exit 1; }
	sleep 0.1
done
[ -n "$URL" ] || { cat "$OUT/server.log"; echo "mediator did not start"; exit 1; }
URL=${URL%/} ADMIN=${ADMIN%/}

# --- load ---
args=(--scenario mixed --url "$URL" --server-pid "$SERVER_PID" --admin "$ADMIN" --admin-token-file "$DATA/admin.token"
	--chat-server-key "$CHATKEY" --chat-pid "$CHAT_PID" --server-groups "$groups" --source-addrs "$SOURCE_ADDRS"
	--devices "$DEVICES" --duration "$DURATION" --ramp "$RAMP" --report-interval "$REPORT"
	--reflect-interval "$REFLECT_INTERVAL" --tx-interval "$TX_INTERVAL" --group-mix "$GROUP_MIX" --json)
# shellcheck disable=SC2206 # LOAD_ARGS is a list of flags
args+=($LOAD_ARGS)
echo "== d2m-load ${args[*]}"
if [ "$SHARDS" = 1 ]; then
	"$BIN/d2m-load" "${args[@]}" --plot "$OUT/mixed.svg" >"$OUT/mixed.json" 2> >(tee "$OUT/mixed.log" >&2)
else
	# One --start-at for all shards, after the slowest ramp, so their
	# report intervals line up for the merge.
	start_at=$(($(date +%s) + 2 * DEVICES / RAMP + 10))
	run_id=$(date +%s)
	LOADS=()
	for i in $(seq 0 $((SHARDS - 1))); do
		"$BIN/d2m-load" "${args[@]}" --shard "$i/$SHARDS" --run-id "$run_id" --start-at "$start_at" \
			>"$OUT/shard-$i.json" 2>"$OUT/shard-$i.log" &
		LOADS+=($!)
		PIDS+=($!)
	done
	tail -f "$OUT/shard-0.log" &
	TAIL=$!
	failed=0
	for pid in "${LOADS[@]}"; do wait "$pid" || failed=1; done
	kill "$TAIL" 2>/dev/null || true
	wait "$TAIL" 2>/dev/null || true
	[ "$failed" = 0 ] || { echo "a load process failed (see $OUT/shard-*.log)"; exit 1; }
	"$BIN/d2m-load" merge --plot "$OUT/mixed.svg" "$OUT"/shard-*.json >"$OUT/mixed.json" 2> >(tee "$OUT/mixed.log" >&2)
fi
stop_all
echo "== done: results in $OUT (mixed.json, mixed.log, server.log, chatstub.log)"
