#!/bin/sh
# Makes a Debian PostgreSQL cluster the synchronous standby of a primary
# set up with setup-primary.sh: stops it, moves its data directory aside,
# copies the primary with pg_basebackup (a replication slot standby1 on the
# primary keeps the WAL the standby has not received; -R writes
# primary_conninfo with application_name=standby1, the name the primary
# waits for), installs standby.conf as conf.d/d2m-mediator.conf and the
# pg_hba lines (used after a failover), and starts it. TestPostgresSetupScripts
# runs it.
#
# As root on the standby, after `apt-get install postgresql`:
#
#   PRIMARY_HOST=192.0.2.11 PRIMARY_ADDR=192.0.2.11/32 MEDIATOR_NET=192.0.2.0/24 \
#   REPLICATION_PASSWORD=… deploy/postgres/setup-standby.sh
#
# Environment:
#   PRIMARY_HOST          host name or address of the primary             required
#   PRIMARY_PORT          its port                                        5432
#   PRIMARY_ADDR          the primary's address (CIDR), allowed to replicate
#                         from here once this standby has been promoted   required
#   MEDIATOR_NET          where the mediators connect from (CIDR)         required
#   REPLICATION_PASSWORD  password of the user replicator                 required
#   PG_VERSION, PG_CLUSTER, PG_CLUSTER_CONF_ROOT   as in setup-primary.sh
#
# The cluster's data directory is moved to <datadir>.before-standby-<time>
# (delete it once the standby runs). The password goes into
# postgresql.auto.conf (primary_conninfo, readable by postgres only).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"

need PRIMARY_HOST PRIMARY_ADDR MEDIATOR_NET REPLICATION_PASSWORD
PRIMARY_PORT=${PRIMARY_PORT:-5432}
find_cluster

say "stopping $PG_VERSION/$PG_CLUSTER"
pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" stop || true
aside="$data.before-standby-$(date +%Y%m%dT%H%M%S)"
mv "$data" "$aside"
say "copying the primary $PRIMARY_HOST:$PRIMARY_PORT into $data (old data: $aside)"
install -d -m 0700 -o postgres -g postgres "$data"
runuser -u postgres -- env PGPASSWORD="$REPLICATION_PASSWORD" "$bindir/pg_basebackup" -D "$data" \
	-d "host=$PRIMARY_HOST port=$PRIMARY_PORT user=replicator application_name=standby1" \
	-C -S standby1 -R -X stream -c fast
install -D -m 0644 -o postgres -g postgres "$here/standby.conf" "$conf/conf.d/d2m-mediator.conf"
set_hba "$PRIMARY_ADDR" "$MEDIATOR_NET"
say "starting $PG_VERSION/$PG_CLUSTER as a standby"
pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start
say "done; on the primary, pg_stat_replication should show standby1 as sync"
