#!/usr/bin/env bash
# A one-node SLURM cluster on this host, for CI and for trying the cluster profile locally.
#
#   sudo .ci/slurm-cluster.sh          # (= start) install, configure and start; idempotent
#   sudo .ci/slurm-cluster.sh status   # daemons and `sinfo`
#   sudo .ci/slurm-cluster.sh stop     # stop the daemons this script started
#
# Runs as root without systemd: munged, slurmctld and slurmd are started directly. No accounting
# database (slurmdbd), so `sacct` does not work; Snakemake needs `--slurm-status-command squeue
# --slurm-no-account` (workflow/profiles/slurm-test). One partition, `debug`, with every CPU of the
# host and its memory minus some headroom. No GPU (GRES) is configured.
#
# Environment: CTAN_SLURM_DIR (state, spool, logs, pid files; default /var/lib/ctan-slurm),
# CTAN_SLURM_WAIT (seconds to wait for the node to become idle; default 60).
set -euo pipefail

BASE=${CTAN_SLURM_DIR:-/var/lib/ctan-slurm}
WAIT=${CTAN_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by ctan .ci/slurm-cluster.sh"
NODE=$(hostname -s)
MUNGE_PID=/run/munge/munged.pid

log() { echo "slurm-cluster: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

running() { # pidfile -> true when the process it names is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_munge_key() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating $key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=$key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge $key
    chmod 700 /etc/munge
    chmod 400 $key
}

slurm_conf() { # the configuration for this host, on stdout
    local cpus mem_mb headroom
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # leave 10% (at least 1 GiB) to the OS and the daemons, but offer at least 16000 MB so that the
    # workflow's per-rule requests (up to 8000 MB) fit on a small runner: memory is only booked here,
    # never enforced (no cgroups), and config_overrides keeps slurmd from draining the node for it
    headroom=$((mem_mb / 10 > 1024 ? mem_mb / 10 : 1024))
    mem_mb=$((mem_mb - headroom))
    mem_mb=$((mem_mb > 16000 ? mem_mb : 16000))
    cat <<EOF
$MARKER; rerun it rather than editing this file.
ClusterName=ctan-test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to squeue for an hour: Snakemake (and tests/test_slurm.py) ask squeue for their state
MinJobAge=3600
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
DefMemPerCPU=$((mem_mb / cpus))
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    if ! running $MUNGE_PID; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged --force
    fi
    munge -n | unmunge >/dev/null || die "munge does not work; see /var/log/munge/munged.log"
}

stop_daemons() {
    local name pidfile pid
    for name in slurmd slurmctld munged; do
        case $name in
        munged) pidfile=$MUNGE_PID ;;
        *) pidfile=$BASE/run/$name.pid ;;
        esac
        running "$pidfile" || continue
        pid=$(cat "$pidfile")
        log "stopping $name (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        rm -f "$pidfile"
    done
}

node_state() {
    # a controller that died after its pid was checked leaves sinfo waiting for it; do not wait forever
    timeout 10 sinfo --noheader --node "$NODE" --format %t 2>/dev/null | head -n 1
}

start() {
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts daemons)"
    install_packages
    write_munge_key
    mkdir -p /etc/slurm "$BASE"/{state,spool,run,log}
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" $CONF; then
        die "$CONF exists and was not written by this script; not touching a real cluster's configuration"
    fi
    local wanted
    wanted=$(slurm_conf)
    if [[ ! -e $CONF ]] || [[ $(cat $CONF) != "$wanted" ]]; then
        log "writing $CONF"
        # a changed configuration (another host, more CPUs) needs the daemons restarted
        if running "$BASE/run/slurmctld.pid" || running "$BASE/run/slurmd.pid"; then
            stop_daemons
        fi
        printf '%s\n' "$wanted" >$CONF
        chmod 644 $CONF
    fi
    start_munge
    if ! running "$BASE/run/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld
    fi
    if ! running "$BASE/run/slurmd.pid"; then
        log "starting slurmd"
        slurmd
    fi
    local state=""
    for _ in $(seq $((WAIT * 2))); do
        state=$(node_state || true)
        case $state in
        idle | mix | alloc) break ;;
        down* | drain* | drng*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    case $state in
    idle | mix | alloc) ;;
    *) die "node $NODE is '${state:-unreachable}' after ${WAIT}s; see $BASE/log/slurmctld.log and $BASE/log/slurmd.log" ;;
    esac
    cancel_orphans
    sinfo
    log "cluster up: node $NODE, partition debug; config $CONF; logs in $BASE/log/"
}

steps_alive() { # job id -> true when a slurmstepd of that job runs on this host
    pgrep -f "^slurmstepd: \\[$1\\." >/dev/null
}

cancel_orphans() {
    # slurmctld restores its saved state on start: a job that was running when the host's processes were
    # killed (a container restarted, no reboot) is listed as RUNNING again, holding its CPUs until its time
    # limit, because the node's boot time did not change. Such a job has no slurmstepd; cancel it. Checked
    # twice, so that a job starting right now (its step not yet forked) is not taken for one.
    local id orphans=()
    for id in $(timeout 10 squeue --noheader --states=RUNNING,COMPLETING,SUSPENDED --format=%i 2>/dev/null); do
        steps_alive "$id" || orphans+=("$id")
    done
    [[ ${#orphans[@]} == 0 ]] && return
    sleep 2
    local dead=()
    for id in "${orphans[@]}"; do
        steps_alive "$id" || dead+=("$id")
    done
    [[ ${#dead[@]} == 0 ]] && return
    log "cancelling jobs whose processes are gone (left by daemons that were killed): ${dead[*]}"
    scancel "${dead[@]}"
}

status() {
    local name pidfile
    for name in munged slurmctld slurmd; do
        case $name in
        munged) pidfile=$MUNGE_PID ;;
        *) pidfile=$BASE/run/$name.pid ;;
        esac
        if running "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; fi
    done
    sinfo || true
    echo "logs: $BASE/log/"
}

case ${1:-start} in
start) start ;;
stop) stop_daemons ;;
status) status ;;
*) die "usage: $0 [start|stop|status]" ;;
esac
