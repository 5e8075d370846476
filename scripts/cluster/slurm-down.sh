#!/usr/bin/env bash
# Stop the one-node cluster that scripts/cluster/slurm-up.sh started (jobs still queued are lost). A SLURM
# that script did not configure, and a munged it did not start, are left running.
set -uo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "slurm-down: needs root (it stops the daemons slurm-up.sh started as root); run it with sudo" >&2
    exit 2
fi
conf=/etc/slurm/slurm.conf
if [ ! -e "$conf" ]; then
    echo "slurm-down: no $conf: slurm-up.sh set up no cluster here; nothing was stopped"
    exit 0
fi
if ! head -n 1 "$conf" | grep -q "^# Written by scripts/cluster/slurm-up.sh"; then
    echo "slurm-down: $conf was not written by slurm-up.sh: this machine's SLURM is its own; nothing was stopped" >&2
    exit 2
fi
stopped=0
for daemon in slurmd slurmctld; do
    pkill -x "$daemon" 2>/dev/null && stopped=1
done
if [ -f /run/fmnist-munged-started ]; then
    pkill -x munged 2>/dev/null && stopped=1
    rm -f /run/fmnist-munged-started
fi
if [ "$stopped" = 1 ]; then echo "slurm-down: stopped"; else echo "slurm-down: nothing was running"; fi
