#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (controller and compute node on localhost), for the
# cluster tests and for trying the SLURM launcher: installs munge and slurm-wlm (Debian packages) if
# missing, writes a minimal /etc/slurm/slurm.conf for this machine's cores and memory (no GPUs), starts
# munged, slurmctld and slurmd, and waits until the node accepts jobs. Idempotent: a running cluster is
# left as it is. Needs root. scripts/cluster/slurm-down.sh stops it.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "slurm-up: needs root (it installs packages and starts daemons); run it with sudo" >&2
    exit 2
fi
exec 9>/run/fmnist-slurm-up.lock  # two callers at once (parallel test workers) take turns
flock 9
conf=/etc/slurm/slurm.conf
MARK="# Written by scripts/cluster/slurm-up.sh"  # the first line of the configuration it writes (slurm-down.sh too)
# A machine with a SLURM of its own (a configuration this script did not write, or daemons running without one,
# as on a configless node) is a cluster of its own: never reconfigured, nor its daemons restarted.
if { [ -e "$conf" ] && ! head -n 1 "$conf" | grep -q "^$MARK"; } \
   || { [ ! -e "$conf" ] && pgrep -x 'slurmctld|slurmd' >/dev/null 2>&1; }; then
    echo "slurm-up: this machine has a SLURM of its own ($conf not written by this script, or its daemons running" \
         "without it), whose configuration and daemons this script would replace; nothing was changed. Use that" \
         "cluster (hydra/launcher=slurm, docs/scaling.md), or run this on a machine without one." >&2
    exit 2
fi
# The daemons started below must not inherit the lock's descriptor (`9>&-`): one that kept it would hold
# the lock for as long as it runs, and every later call would wait on it forever.
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v pgrep >/dev/null; then
    echo "slurm-up: installing munge and slurm-wlm"
    packages="slurm-wlm munge procps"
    "$(dirname "$0")/apt-install.sh" $packages
fi

node=$(hostname -s)
cpus=$(nproc)
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave a tenth to the system
wanted=$(cat <<CONF
${MARK}: one node, this machine, on the loopback address (the host
# name need not resolve, as in many containers).
ClusterName=fmnist
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Short scheduler passes, so that a job starts within seconds; KillWait leaves a cancelled job time to record
# its stop on a loaded machine before SIGKILL.
KillWait=30
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=600
OverTimeLimit=0
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
    echo "$wanted" > "$conf"
    restart=1
fi

if [ ! -s /etc/munge/munge.key ]; then
    /usr/sbin/mungekey --create --force >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null 9>&- || /usr/sbin/munged --force 9>&-
    touch /run/fmnist-munged-started  # slurm-down.sh stops munged only if this script started it
fi

if [ "${restart:-0}" = 1 ]; then  # the old daemons save their state and free their ports first
    pkill -x slurmctld 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    for _ in $(seq 1 30); do { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null || break; sleep 0.5; done
fi
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld 9>&-
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd 9>&-

for _ in $(seq 1 60); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
    case "$state" in
        idle*|mixed*|allocated*) echo "slurm-up: node ${node} ${state}, ${cpus} CPUs, ${memory_mb} MB (SLURM $(sinfo -V | cut -d' ' -f2))"; exit 0 ;;
        down*|drain*) scontrol update nodename="${node}" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
done
echo "slurm-up: the node did not become ready in 60 s (state: ${state:-none}); see /var/log/slurm/slurmctld.log and slurmd.log" >&2
tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
