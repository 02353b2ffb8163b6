#!/bin/sh
# Makes a Debian PostgreSQL cluster the primary of the mediator's store:
# the replication settings (primary.conf, as conf.d/d2m-mediator.conf),
# pg_hba lines for the standby and the mediators, a replication user
# "replicator", a user "mediator" (allowed to read replication statistics)
# and its database "mediator". Then run
# setup-standby.sh on the standby. OPERATIONS.md, "PostgreSQL: a primary
# with a synchronous standby", walks through both; TestPostgresSetupScripts
# runs them.
#
# As root on the primary, after `apt-get install postgresql`:
#
#   STANDBY_ADDR=192.0.2.12/32 MEDIATOR_NET=192.0.2.0/24 \
#   REPLICATION_PASSWORD=… MEDIATOR_PASSWORD=… deploy/postgres/setup-primary.sh
#
# Environment:
#   STANDBY_ADDR          the standby's address (CIDR) for replication    required
#   MEDIATOR_NET          where the mediators connect from (CIDR)         required
#   REPLICATION_PASSWORD  password of the user replicator                  required
#   MEDIATOR_PASSWORD     password of the user mediator                    required
#   PG_VERSION            PostgreSQL major version            the newest installed
#   PG_CLUSTER            Debian cluster name                              main
#   PG_CLUSTER_CONF_ROOT  Debian's configuration root           /etc/postgresql
#
# It can run again (it replaces its own lines and files and updates the
# passwords). Until the standby is attached, every commit on this primary
# waits for it; this script's own statements do not (synchronous_commit =
# local for its session).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"

need STANDBY_ADDR MEDIATOR_NET REPLICATION_PASSWORD MEDIATOR_PASSWORD
find_cluster

install -D -m 0644 -o postgres -g postgres "$here/primary.conf" "$conf/conf.d/d2m-mediator.conf"
set_hba "$STANDBY_ADDR" "$MEDIATOR_NET"
say "restarting $PG_VERSION/$PG_CLUSTER"
pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" restart

say "users replicator and mediator, database mediator"
sql -v rpw="$REPLICATION_PASSWORD" -v mpw="$MEDIATOR_PASSWORD" <<'SQL'
SELECT 'CREATE ROLE replicator' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'replicator') \gexec
ALTER ROLE replicator WITH REPLICATION LOGIN PASSWORD :'rpw';
SELECT 'CREATE ROLE mediator' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mediator') \gexec
ALTER ROLE mediator WITH LOGIN PASSWORD :'mpw';
-- The mediator counts the connected synchronous standbys at start
-- (pg_stat_replication.sync_state, which PostgreSQL shows only to
-- superusers and this role); without it the startup line says
-- "0 connected" and warns although the standby is there.
GRANT pg_read_all_stats TO mediator;
SELECT 'CREATE DATABASE mediator OWNER mediator' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mediator') \gexec
SQL
say "done; now run setup-standby.sh on the standby"
