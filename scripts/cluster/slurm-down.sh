#!/usr/bin/env bash
# Stop the one-node cluster that scripts/cluster/slurm-up.sh started (jobs still queued are lost).
set -uo pipefail
pkill -x slurmd 2>/dev/null
pkill -x slurmctld 2>/dev/null
pkill -x munged 2>/dev/null
echo "slurm-down: stopped"
