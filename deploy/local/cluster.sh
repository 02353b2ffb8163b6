#!/usr/bin/env bash
# A three-node mediator cluster on this machine, for trying cluster mode and
# for development (not a production layout: OPERATIONS.md, "From a bare
# Debian host to a three-node cluster"). It starts
#
#   - three etcd members (Debian's etcd-server; why that one: README, "Try a
#     cluster on one machine"),
#   - one stand-in chat server (bin/chatstub) that every node proxies to,
#   - three `mediator serve` nodes in cluster mode (bbolt store each) with
#     one admin token file,
#   - HAProxy in front, routing each device to its shard's node by the map
#     the nodes serve,
#
# prints the device URL, the chat server's key and a d2m-device command
# line, and runs until Ctrl-C (SIGINT) or SIGTERM, which stop everything it
# started: the nodes first (they close their devices with 1001 and leave
# the cluster while etcd is still there), then HAProxy, the chat server and
# etcd. A process that dies on its own is reported; the rest keeps running.
#
#   make cluster                      builds bin/ and runs this script
#   BIN=bin deploy/local/cluster.sh   the same with binaries built already
#
# Needs etcd, haproxy and curl (Debian: apt-get install etcd-server haproxy
# curl) and, in $BIN, mediator and chatstub. State and logs stay in
# $CLUSTER_DATA across runs (same chat server key, same devices); remove the
# directory for a fresh cluster. Every address can be changed through the
# environment (all on 127.0.0.1):
#
#   BIN                      mediator, chatstub (and d2m-device)   ./bin
#   CLUSTER_DATA             state and logs                       ./data/cluster
#   CLUSTER_PORT             HAProxy: the devices' port            8440
#   CLUSTER_NODE_PORTS       the nodes' device ports               "8771 8772 8773"
#   CLUSTER_ADMIN_PORTS      the nodes' admin ports                "8781 8782 8783"
#   CLUSTER_ETCD_PORTS       etcd client ports                     "12379 22379 32379"
#   CLUSTER_ETCD_PEER_PORTS  etcd peer ports                       "12380 22380 32380"
#   CLUSTER_CHAT_PORT        the stand-in chat server              15222
set -euo pipefail

BIN=${BIN:-./bin}
DATA=${CLUSTER_DATA:-./data/cluster}
PORT=${CLUSTER_PORT:-8440}
read -r -a NODE_PORTS <<<"${CLUSTER_NODE_PORTS:-8771 8772 8773}"
read -r -a ADMIN_PORTS <<<"${CLUSTER_ADMIN_PORTS:-8781 8782 8783}"
read -r -a ETCD_PORTS <<<"${CLUSTER_ETCD_PORTS:-12379 22379 32379}"
read -r -a ETCD_PEER_PORTS <<<"${CLUSTER_ETCD_PEER_PORTS:-12380 22380 32380}"
CHAT_PORT=${CLUSTER_CHAT_PORT:-15222}
HOST=127.0.0.1
NODES=(m1 m2 m3)

say() { echo "cluster: $*" >&2; }
die() { say "$*"; exit 1; }

[ "${#NODE_PORTS[@]}" = 3 ] || die "CLUSTER_NODE_PORTS: want three ports, got '${NODE_PORTS[*]}'"
[ "${#ADMIN_PORTS[@]}" = 3 ] || die "CLUSTER_ADMIN_PORTS: want three ports, got '${ADMIN_PORTS[*]}'"
[ "${#ETCD_PORTS[@]}" = 3 ] || die "CLUSTER_ETCD_PORTS: want three ports, got '${ETCD_PORTS[*]}'"
[ "${#ETCD_PEER_PORTS[@]}" = 3 ] || die "CLUSTER_ETCD_PEER_PORTS: want three ports, got '${ETCD_PEER_PORTS[*]}'"
for tool in etcd:etcd-server haproxy:haproxy curl:curl; do
	command -v "${tool%%:*}" >/dev/null || die "${tool%%:*} is not installed (Debian: apt-get install ${tool#*:})"
done
for b in mediator chatstub; do
	[ -x "$BIN/$b" ] || die "$BIN/$b not found: run make cluster (or make build) first"
done

mkdir -p "$DATA/logs"
DATA=$(cd "$DATA" && pwd)
LOGS=$DATA/logs

# Job control: every process started below gets a process group of its own,
# so a Ctrl-C at the terminal reaches this script alone, which then stops
# them in order (etcd last: the nodes leave the cluster through it).
set -m

declare -A PIDS=() # name -> pid
ORDER=()           # names in start order
stopping=0

# stop_all ends every process still running, newest first, waiting for
# each group (nodes, then the rest one by one).
stop_all() {
	[ "$stopping" = 1 ] && return
	stopping=1
	local group=() name
	for name in "${NODES[@]}"; do
		[ -n "${PIDS[$name]:-}" ] && group+=("${PIDS[$name]}")
	done
	[ "${#group[@]}" -gt 0 ] && say "stopping the nodes"
	stop_pids "${group[@]}"
	for ((i = ${#ORDER[@]} - 1; i >= 0; i--)); do
		name=${ORDER[$i]}
		case " ${NODES[*]} " in *" $name "*) continue ;; esac
		stop_pids "${PIDS[$name]}"
	done
	say "stopped"
}

stop_pids() {
	local p
	for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

trap 'stop_all; exit 0' INT TERM
trap 'stop_all' EXIT

# start NAME CMD...: runs CMD in the background, stdin closed, output into
# $LOGS/NAME.log.
start() {
	local name=$1
	shift
	"$@" </dev/null >"$LOGS/$name.log" 2>&1 &
	PIDS[$name]=$!
	ORDER+=("$name")
}

# wait_until NAME WHAT CMD...: waits up to 30 s for CMD to succeed while
# process NAME runs; otherwise shows the end of its log and gives up.
wait_until() {
	local name=$1 what=$2
	shift 2
	for _ in $(seq 300); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		if ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
			tail -n 20 "$LOGS/$name.log" >&2 || true
			die "$name exited before $what (log: $LOGS/$name.log)"
		fi
		sleep 0.1
	done
	tail -n 20 "$LOGS/$name.log" >&2 || true
	die "$name: no $what after 30 s (log: $LOGS/$name.log)"
}

# etcd: three members on loopback.
initial=() endpoints=()
for i in 0 1 2; do
	initial+=("e$((i + 1))=http://$HOST:${ETCD_PEER_PORTS[$i]}")
	endpoints+=("http://$HOST:${ETCD_PORTS[$i]}")
done
initial=$(
	IFS=,
	echo "${initial[*]}"
)
ETCD=$(
	IFS=,
	echo "${endpoints[*]}"
)
for i in 0 1 2; do
	name=e$((i + 1))
	start "etcd-$name" etcd --name "$name" --data-dir "$DATA/etcd-$name" \
		--listen-client-urls "http://$HOST:${ETCD_PORTS[$i]}" --advertise-client-urls "http://$HOST:${ETCD_PORTS[$i]}" \
		--listen-peer-urls "http://$HOST:${ETCD_PEER_PORTS[$i]}" --initial-advertise-peer-urls "http://$HOST:${ETCD_PEER_PORTS[$i]}" \
		--initial-cluster "$initial" --initial-cluster-token d2m-local-cluster --initial-cluster-state new \
		--logger zap --log-outputs stderr
done
for i in 0 1 2; do
	wait_until "etcd-e$((i + 1))" "a healthy etcd" curl -fsS --max-time 2 "http://$HOST:${ETCD_PORTS[$i]}/health"
done
say "etcd: 3 members at $ETCD"

# One stand-in chat server for all nodes: a device forwarded to another
# node logs in through that node, so every node must reach the same one.
start chatstub "$BIN/chatstub" --listen "$HOST:$CHAT_PORT" --key-file "$DATA/chatstub.key" --log-format json
wait_until chatstub "its public key" grep -q '^public key: ' "$LOGS/chatstub.log"
CHAT_KEY=$(sed -n 's/^public key: //p' "$LOGS/chatstub.log")

# One admin token file for all nodes (mediator serve --admin-token-file).
TOKEN_FILE=$DATA/admin.token
if [ ! -s "$TOKEN_FILE" ]; then
	(umask 077 && od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE")
fi

for i in 0 1 2; do
	name=${NODES[$i]}
	start "$name" "$BIN/mediator" serve --data "$DATA/$name" \
		--listen "$HOST:${NODE_PORTS[$i]}" --admin-listen "$HOST:${ADMIN_PORTS[$i]}" \
		--admin-token-file "$TOKEN_FILE" --chat-server "$HOST:$CHAT_PORT" \
		--cluster-etcd "$ETCD" --node-id "$name" --log-format json
done
served() { # ADMIN_PORT: all 256 shards in that node's map
	[ "$(curl -fsS --max-time 2 -H "Authorization: Bearer $(cat "$TOKEN_FILE")" \
		"http://$HOST:$1/cluster/haproxy.map" | grep -c '^[0-9a-f][0-9a-f] ')" = 256 ]
}
for i in 0 1 2; do
	wait_until "${NODES[$i]}" "all 256 shards served" served "${ADMIN_PORTS[$i]}"
done
say "nodes: ${NODES[*]} serve all 256 shards"

# --- HAProxy: kept small on purpose -------------------------------------
# A config rendered here and the shard map loaded once from m1 at start.
# After a move HAProxy still sends the moved shard's devices to the old
# node, which forwards them (one hop, still correct). The shipped cluster
# configuration is deploy/haproxy/; a command that keeps the map current
# will replace this block.
curl -fsS --max-time 5 -H "Authorization: Bearer $(cat "$TOKEN_FILE")" \
	"http://$HOST:${ADMIN_PORTS[0]}/cluster/haproxy.map" >"$DATA/haproxy.map"
{
	cat <<CFG
global
    log stdout format raw local0
    stats socket $DATA/haproxy.sock mode 600 level admin
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 150s
    timeout server 150s
    timeout tunnel 24h
frontend devices
    bind $HOST:$PORT
    # /<prefix8>/…: the first path segment is the shard, two hex digits.
    use_backend %[path,field(2,/),lower,map($DATA/haproxy.map,mediators)]
    default_backend mediators
backend mediators
    option httpchk GET /readyz
CFG
	for i in 0 1 2; do
		echo "    server ${NODES[$i]} $HOST:${NODE_PORTS[$i]} check port ${ADMIN_PORTS[$i]}"
	done
	for i in 0 1 2; do
		printf 'backend %s\n    option httpchk GET /readyz\n    server %s %s:%s check port %s\n' \
			"${NODES[$i]}" "${NODES[$i]}" "$HOST" "${NODE_PORTS[$i]}" "${ADMIN_PORTS[$i]}"
	done
} >"$DATA/haproxy.cfg"
haproxy -c -q -f "$DATA/haproxy.cfg" || die "haproxy rejects $DATA/haproxy.cfg"
rm -f "$DATA/haproxy.sock"
start haproxy haproxy -db -f "$DATA/haproxy.cfg"
# The runtime socket appears once the listeners are bound.
wait_until haproxy "its runtime socket" test -S "$DATA/haproxy.sock"
# --- end of the HAProxy part -------------------------------------------

node_urls=()
for i in 0 1 2; do node_urls+=("${NODES[$i]} ws://$HOST:${NODE_PORTS[$i]}"); done
cat <<EOF

The cluster is up: 3 etcd members, 3 nodes, 256 shards served.

  device URL   ws://$HOST:$PORT   (HAProxy: each device goes to its shard's node)
  nodes        ${node_urls[0]}, ${node_urls[1]}, ${node_urls[2]}
               (any node takes any device and forwards it to the shard's node)
  chat server  $HOST:$CHAT_PORT (stand-in), public key $CHAT_KEY
  admin        $HOST:${ADMIN_PORTS[0]} $HOST:${ADMIN_PORTS[1]} $HOST:${ADMIN_PORTS[2]}, token file $TOKEN_FILE
  logs         $LOGS/

Connect a device (another terminal; it prints the line for a second device):

  $BIN/d2m-device --url ws://$HOST:$PORT --chat-server-key $CHAT_KEY --new --identity ALICE001

Look at the cluster:

  $BIN/mediator --admin $HOST:${ADMIN_PORTS[0]} --admin-token-file $TOKEN_FILE cluster shards

Ctrl-C stops everything.
EOF

# Runs until a signal (the trap above). A process that ends by itself is
# reported and the rest keeps running: kill a node to watch its shards
# answer 503 and the controller move to another node.
set +e
declare -A GONE=()
while [ "${#GONE[@]}" -lt "${#ORDER[@]}" ]; do
	wait -n
	code=$?
	for name in "${ORDER[@]}"; do
		if [ -z "${GONE[$name]:-}" ] && ! kill -0 "${PIDS[$name]}" 2>/dev/null; then
			GONE[$name]=1
			say "$name exited (status $code; log: $LOGS/$name.log); the rest keeps running, Ctrl-C stops it"
		fi
	done
done
say "every process has exited"
exit 1
