#!/usr/bin/env bash
# Stop the PostgreSQL server that scripts/cluster/postgres-up.sh started (its databases are kept). A server
# that was running before postgres-up.sh (this machine's own) is left running.
set -uo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "postgres-down: needs root (it stops the server postgres-up.sh started); run it with sudo" >&2
    exit 2
fi
marker=/run/fmnist-postgres-started
if [ ! -f "$marker" ]; then
    echo "postgres-down: no server started by postgres-up.sh since this machine started; nothing was stopped"
    exit 0
fi
version=$(cat "$marker")
if ! pg_ctlcluster "$version" main status >/dev/null 2>&1; then  # stopped since (or a marker older than a restart)
    rm -f "$marker"
    echo "postgres-down: PostgreSQL $version is not running; nothing was stopped"
    exit 0
fi
if pg_ctlcluster "$version" main stop; then
    rm -f "$marker"
    echo "postgres-down: stopped"
else
    echo "postgres-down: could not stop PostgreSQL $version (above)" >&2
    exit 1
fi
