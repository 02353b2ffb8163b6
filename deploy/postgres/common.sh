# Shared by setup-primary.sh and setup-standby.sh (sourced, not run).

say() { echo "d2m-postgres: $*" >&2; }
die() { say "$*"; exit 1; }

# need VAR...: each must be set and non-empty.
need() {
	for v in "$@"; do
		eval "[ -n \"\${$v:-}\" ]" || die "$v is required (see the comment at the top of $0)"
	done
}

# find_cluster sets PG_VERSION, PG_CLUSTER, conf (the cluster's
# configuration directory), data (its data directory) and bindir.
find_cluster() {
	if [ -z "${PG_VERSION:-}" ]; then
		PG_VERSION=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
	fi
	PG_CLUSTER=${PG_CLUSTER:-main}
	bindir=/usr/lib/postgresql/$PG_VERSION/bin
	[ -x "$bindir/postgres" ] || die "no PostgreSQL $PG_VERSION in $bindir (apt-get install postgresql)"
	conf=${PG_CLUSTER_CONF_ROOT:-/etc/postgresql}/$PG_VERSION/$PG_CLUSTER
	[ -f "$conf/postgresql.conf" ] || die "no cluster $PG_VERSION/$PG_CLUSTER ($conf/postgresql.conf missing; pg_lsclusters lists them)"
	data=$(pg_conftool -s "$PG_VERSION" "$PG_CLUSTER" show data_directory)
	[ -n "$data" ] || die "cluster $PG_VERSION/$PG_CLUSTER: no data_directory in $conf/postgresql.conf"
}

# set_hba REPLICATION_ADDR MEDIATOR_NET puts the lines of pg_hba.conf
# (beside this file), addresses filled in, at the top of the cluster's
# pg_hba.conf, replacing the ones an earlier run put there.
set_hba() {
	hba=$conf/pg_hba.conf
	tmp=$(mktemp "$hba.XXXXXX")
	{
		echo "# d2m-mediator begin (deploy/postgres/pg_hba.conf)"
		sed -e '/^#/d' -e '/^$/d' -e "s|STANDBY_ADDR|$1|" -e "s|MEDIATOR_NET|$2|" "$here/pg_hba.conf"
		echo "# d2m-mediator end"
		sed '/^# d2m-mediator begin/,/^# d2m-mediator end/d' "$hba"
	} >"$tmp"
	chown postgres:postgres "$tmp"
	chmod 0640 "$tmp"
	mv "$tmp" "$hba"
}

# sql runs psql as postgres on the cluster, statements from stdin; its
# commits do not wait for a standby that may not be there yet.
sql() {
	runuser -u postgres -- env PGOPTIONS="-c synchronous_commit=local" \
		psql --cluster "$PG_VERSION/$PG_CLUSTER" -X -q -v ON_ERROR_STOP=1 "$@"
}
