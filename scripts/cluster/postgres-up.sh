#!/usr/bin/env bash
# A PostgreSQL server on this machine with a database for Optuna studies, for the cluster tests and for
# trying `tune.py storage=...` with several processes: installs Debian's postgresql if missing, starts
# its cluster, creates the role and database `fmnist` (password `fmnist`) if missing, and prints the URL
# to pass as `storage=`. Idempotent; needs root. scripts/cluster/postgres-down.sh stops it (if it started it).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "postgres-up: needs root (it installs packages and starts the server); run it with sudo" >&2
    exit 2
fi
marker=/run/fmnist-postgres-started  # a server this script installed, created or started: postgres-down.sh stops it
if ! command -v pg_ctlcluster >/dev/null; then
    installed=1
    echo "postgres-up: installing postgresql" >&2
    "$(dirname "$0")/apt-install.sh" postgresql
fi
version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    pg_createcluster "$version" main >/dev/null
    installed=1
fi
if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then
    pg_ctlcluster "$version" main start
    installed=1
fi
[ "${installed:-0}" = 1 ] && echo "$version" > "$marker"
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
as_postgres() { su postgres -c "psql -p $port -qtAc \"$1\""; }
ready=0
for _ in $(seq 1 60); do as_postgres "SELECT 1" >/dev/null 2>&1 && { ready=1; break; }; sleep 1; done
if [ "$ready" != 1 ]; then
    echo "postgres-up: PostgreSQL $version (cluster main, port $port) was started but took no query within 60 s;" \
         "its log: /var/log/postgresql/postgresql-$version-main.log" >&2
    exit 1
fi
if [ "$(as_postgres "SELECT 1 FROM pg_roles WHERE rolname='fmnist'")" != 1 ]; then
    as_postgres "CREATE ROLE fmnist LOGIN PASSWORD 'fmnist'"
fi
if [ "$(as_postgres "SELECT 1 FROM pg_database WHERE datname='fmnist'")" != 1 ]; then
    as_postgres "CREATE DATABASE fmnist OWNER fmnist"
fi
echo "postgresql+psycopg2://fmnist:fmnist@localhost:${port}/fmnist"
