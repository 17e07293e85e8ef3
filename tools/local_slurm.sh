#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (localhost), for the tests and for trying
# `megadoc run --execute slurm` without a cluster: munged, slurmctld and slurmd, everything under one
# folder. Needs root and Debian's slurm-wlm (installed here with apt-get when missing).
#
#   bash tools/local_slurm.sh start     # idempotent: starts what is not running; sinfo shows the node idle
#   bash tools/local_slurm.sh status    # sinfo, squeue
#   bash tools/local_slurm.sh stop      # the daemons stop; the folder stays (its logs)
#
# Variables: MEGADOC_SLURM_DIR (default /tmp/megadoc-slurm): state, spool, logs and slurm.conf.
# Clients (sbatch, squeue, ...) find the configuration through /etc/slurm/slurm.conf, linked to the
# folder's when no other configuration is there; otherwise export SLURM_CONF as `start` says.
set -euo pipefail
D=${MEGADOC_SLURM_DIR:-/tmp/megadoc-slurm}
CONF=$D/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf

fail() { echo "local_slurm.sh: $*" >&2; exit 1; }

install_slurm() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" -eq 0 ] || fail "slurm-wlm is not installed and this is not root: apt-get install -y slurm-wlm"
  echo "local_slurm.sh: installing slurm-wlm (apt-get, about a minute)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null \
    || fail "apt-get install slurm-wlm failed"
}

write_conf() {
  local host memory
  host=$(hostname -s)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MB, leaving 20% to the system
  mkdir -p "$D/state" "$D/spool"
  cat > "$CONF.tmp" <<CONF
# Written by tools/local_slurm.sh: one node, this machine.
ClusterName=megadoc-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# A requeued job waits cred_expire seconds before it may start again (120 by default); the scheduler
# looks at the queue every few seconds instead of every minute: a test's requeues take seconds.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=5,bf_interval=5
NodeName=$host CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  mv "$CONF.tmp" "$CONF"
}

link_conf() {
  if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then return; fi
  if [ -e "$SYSTEM_CONF" ]; then
    echo "local_slurm.sh: $SYSTEM_CONF is another cluster's; clients need: export SLURM_CONF=$CONF"
    return
  fi
  mkdir -p "$(dirname "$SYSTEM_CONF")" && ln -s "$CONF" "$SYSTEM_CONF"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_slurm
  mkdir -p "$D" /run/munge
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    /usr/sbin/munged --force || fail "munged did not start (is /etc/munge/munge.key there?)"
  fi
  running "$D/slurmctld.pid" || write_conf
  link_conf
  running "$D/slurmctld.pid" || slurmctld -f "$CONF" || fail "slurmctld did not start: see $D/slurmctld.log"
  running "$D/slurmd.pid" || slurmd -f "$CONF" || fail "slurmd did not start: see $D/slurmd.log"
  for _ in $(seq 60); do
    if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      SLURM_CONF=$CONF sinfo
      return
    fi
    sleep 1
  done
  fail "the node did not come up within 60 s: see $D/slurmctld.log and $D/slurmd.log"
}

stop() {
  SLURM_CONF=$CONF scontrol shutdown >/dev/null 2>&1 || true
  for _ in $(seq 30); do
    running "$D/slurmctld.pid" || running "$D/slurmd.pid" || break
    sleep 1
  done
  if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then rm "$SYSTEM_CONF"; fi
  echo "local_slurm.sh: stopped (logs in $D)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo && SLURM_CONF=$CONF squeue ;;
  *) fail "usage: bash tools/local_slurm.sh start|status|stop" ;;
esac
