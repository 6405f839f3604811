#!/usr/bin/env bash
# One-node Slurm cluster on this machine for tests: munge + slurmctld + slurmd, no systemd.
#   bash slurm/local_cluster.sh start|stop|status
# Idempotent: `start` returns at once when the node already answers with this script's config (a changed
# config restarts the daemons); the ports (6817-6818) and /etc/slurm are machine-wide, so there is one
# local cluster per machine. A job without --mem gets DefMemPerCPU per CPU (not the whole node), so
# 1-CPU jobs run side by side. Needs root and the
# Debian packages slurm-wlm + munge (tools/services.sh installs them). State, logs and pid files
# live in $SLURM_LOCAL_DIR (default /tmp/klong-slurm).
set -euo pipefail
STATE=${SLURM_LOCAL_DIR:-/tmp/klong-slurm}
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))}
HOST=$(hostname -s)
CONF=/etc/slurm/slurm.conf

log() { echo "local_cluster: $*" >&2; }

write_conf() {
    mkdir -p /etc/slurm "$STATE"/{ctld,d}
    cat > "$CONF.new" <<CONF
ClusterName=klong
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( MEM_MB / CPUS ))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
KillWait=5
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

node_ready() { sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; }

start() {
    command -v slurmctld >/dev/null || { log "slurm-wlm not installed (run tools/services.sh)"; exit 1; }
    write_conf
    if cmp -s "$CONF.new" "$CONF"; then
        rm -f "$CONF.new"
        if node_ready; then log "already running"; return 0; fi
    else
        mv "$CONF.new" "$CONF"
        stop  # daemons started with another config re-read this one
        for _ in $(seq 1 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.5; done
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R munge: /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 0400 /etc/munge/munge.key
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 60); do
        if node_ready; then log "node ${HOST} ready"; return 0; fi
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    log "node did not become idle; see ${STATE}/slurmctld.log and ${STATE}/slurmd.log"
    sinfo -N >&2 || true
    exit 1
}

stop() {
    for d in slurmd slurmctld; do
        if pid=$(pgrep -x "$d"); then kill "$pid" && log "stopped $d"; fi
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) if node_ready; then sinfo -N; else log "not running"; exit 1; fi ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
