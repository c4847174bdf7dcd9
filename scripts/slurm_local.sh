#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (as root): Debian's slurm-wlm and munge, a slurm.conf for
# this host, munged + slurmctld + slurmd, then a wait until `sinfo` shows the node idle.
# Idempotent: a second call finds the daemons up and only re-checks the node. Used by .ci/run so the
# tests can submit real job arrays (tests/launch); not needed to use rst-mart on a real cluster.
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "scripts/slurm_local.sh must run as root (it installs packages and starts daemons)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
# RealMemory must not exceed what slurmd measures, or the node comes up INVALID: leave a margin.
memory=$(( $(free -m | awk '/^Mem:/ {print $2}') * 9 / 10 ))
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
wanted=$(cat <<EOF
# Written by rst-mart's scripts/slurm_local.sh: one node, every job runs on it.
ClusterName=rstmart
SlurmctldHost=${host}
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again after this many seconds (default 120: a slow requeue test).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Pending jobs (a requeued one whose begin time has come) are looked at every 2 s, not every 60 s.
SchedulerParameters=sched_interval=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to squeue this long (s): the sweep reads their final state there.
MinJobAge=600
KillWait=10
NodeName=${host} CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -e "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
    printf '%s\n' "$wanted" > "$conf"
    changed=1
fi

if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key

running() { pgrep -x "$1" >/dev/null; }
if ! running munged; then
    # --force: a stale socket left by a killed munged must not stop a new one.
    su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force
fi
if [ "$changed" -eq 1 ] && running slurmctld; then
    # A restart, not `scontrol reconfigure`: slurmctld reads some settings (cred_expire) only at start.
    scontrol shutdown >/dev/null 2>&1 || true
    while running slurmctld || running slurmd; do sleep 0.2; done
fi
running slurmctld || slurmctld
running slurmd || slurmd

deadline=$(( $(date +%s) + 60 ))
until sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)$'; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "slurm_local.sh: node ${host} not up after 60 s; sinfo says:" >&2
        sinfo -N >&2 || true
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1
    fi
    # A node that was DOWN from an earlier run is brought back (ReturnToService=2 does this on register).
    scontrol update NodeName="${host}" State=RESUME 2>/dev/null || true
    sleep 1
done
echo "slurm_local.sh: node ${host} up ($(sinfo -h -N -o '%T'), ${cpus} CPUs, ${memory} MiB)"
