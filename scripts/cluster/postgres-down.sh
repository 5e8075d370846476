#!/usr/bin/env bash
# Stop the PostgreSQL server that scripts/cluster/postgres-up.sh started (its databases are kept).
set -uo pipefail
for version in $(ls /etc/postgresql 2>/dev/null); do
    pg_ctlcluster "$version" main stop 2>/dev/null
done
echo "postgres-down: stopped"
