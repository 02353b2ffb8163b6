#!/usr/bin/env bash
# pgbench.sh: the PostgreSQL store against the bbolt file in the same run
# (BENCHMARKS.md "PostgreSQL store"). It starts a PostgreSQL primary with a
# synchronous standby on loopback ports (as the postgres user when run as
# root; binaries from Debian's postgresql package), then for each of $RUNS
# runs storebench.sh with bbolt and with PostgreSQL, alternating, $REPEAT
# times. Everything it started is stopped at the end.
#
#   make build && BIN=bin cmd/d2m-load/pgbench.sh
#   RUNS="pipeline:8" REPEAT=1 BIN=bin cmd/d2m-load/pgbench.sh
#   SETUP_ONLY=1 BIN=bin cmd/d2m-load/pgbench.sh   # start the two servers, print
#       the DSN and leave them running (stop: pg_ctl -D DIR/{standby,primary} stop)
set -euo pipefail
BIN=$(cd "${BIN:?BIN=directory with mediator and d2m-load}" && pwd)
RUNS=${RUNS:-"pipeline:8 rate:2000"}
REPEAT=${REPEAT:-2}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
OUT=${OUT:-$(mktemp -d /tmp/pgbench.XXXXXX)}
DIR=$(mktemp -d /tmp/pgbench-db.XXXXXX)
chmod 755 "$DIR"
as_pg=()
[ "$(id -u)" = 0 ] && { chown postgres: "$DIR"; as_pg=(runuser -u postgres --); }
P1=${P1:-15432} P2=${P2:-15433}
cleanup() {
	"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/standby" -m immediate stop >/dev/null 2>&1 || true
	"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/primary" -m immediate stop >/dev/null 2>&1 || true
	rm -rf "$DIR"
}
[ "${SETUP_ONLY:-0}" = 1 ] || trap cleanup EXIT
"${as_pg[@]}" "$PGBIN/initdb" -D "$DIR/primary" -U postgres -A trust --no-sync >/dev/null
cat >>"$DIR/primary/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $P1
unix_socket_directories = '$DIR'
max_connections = 100
shared_buffers = 256MB
synchronous_standby_names = 'FIRST 1 (standby1)'
synchronous_commit = on
CONF
echo "host replication postgres 127.0.0.1/32 trust" >>"$DIR/primary/pg_hba.conf"
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/primary" -l "$DIR/primary.log" -w start >/dev/null
"${as_pg[@]}" "$PGBIN/pg_basebackup" -h 127.0.0.1 -p $P1 -U postgres -D "$DIR/standby" -R -X stream -C -S standby1 \
	-d "application_name=standby1" >/dev/null
cat >>"$DIR/standby/postgresql.conf" <<CONF
port = $P2
synchronous_standby_names = ''
CONF
"${as_pg[@]}" "$PGBIN/pg_ctl" -D "$DIR/standby" -l "$DIR/standby.log" -w start >/dev/null
for _ in $(seq 1 100); do
	s=$(psql -X -At "postgres://postgres@127.0.0.1:$P1/postgres" -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'")
	[ "$s" = sync ] && break
	sleep 0.1
done
echo "# postgres $("$PGBIN/postgres" --version | awk '{print $3}') primary :$P1, synchronous standby :$P2 ($s); out=$OUT"
if [ "${SETUP_ONLY:-0}" = 1 ]; then
	echo "postgres://postgres@127.0.0.1:$P1/postgres?sslmode=disable  (data in $DIR)"
	exit 0
fi
# PostgreSQL's own CPU (both servers; backends are counted when their
# postmaster reaps them): utime+stime+cutime+cstime of each postmaster.
pgcpu() {
	local t=0 pid
	for d in primary standby; do
		pid=$(head -1 "$DIR/$d/postmaster.pid")
		t=$((t + $(awk '{print $14 + $15 + $16 + $17}' /proc/$pid/stat)))
	done
	echo $t
}
for i in $(seq 1 "$REPEAT"); do
	for run in $RUNS; do
		echo "## bbolt $run"
		OUT="$OUT/bolt-$i" RUNS=$run BIN=$BIN "$(dirname "$0")/storebench.sh" | grep -v '^#'
		echo "## postgres $run"
		c0=$(pgcpu)
		line=$(OUT="$OUT/pg-$i" RUNS=$run BIN=$BIN PG_DSN_BASE="postgres://postgres@127.0.0.1:$P1" "$(dirname "$0")/storebench.sh" | grep -v '^#')
		c1=$(pgcpu)
		n=$(echo "$line" | sed 's/.*reflects=\([0-9]*\) .*/\1/')
		echo "$line"
		echo "    postgres CPU (primary + standby, whole run incl. setup): $(((c1 - c0) * 10)) ms, $(awk -v t=$((c1 - c0)) -v n="$n" 'BEGIN {printf "%.1f", t * 1e4 / n}') us per acked reflect"
	done
done
