#!/usr/bin/env bash
# Start (or stop) a one-node Slurm cluster on this machine for the Slurm test: Debian's
# slurm-wlm and munge; munged runs as user munge, slurmctld and slurmd as root.
#
# usage: slurm-cluster.sh start|stop        (needs root)
set -o errexit -o nounset -o pipefail

state="${SLURM_TEST_STATE:-/tmp/ddp-template-slurm}"
conf=/etc/slurm/slurm.conf

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  mkdir -p "$state" /var/spool/slurmctld /var/spool/slurmd /etc/slurm /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key /run/munge
  chmod 0400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

  local memory_mb
  memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat >"$conf" <<CONF
ClusterName=ddp-template-test
SlurmctldHost=$(hostname)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$(hostname) CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  local deadline=$((SECONDS + 60))
  until sinfo -h -o %t 2>/dev/null | grep -qx idle; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "ERROR: the Slurm node did not become idle within 60s:" >&2
      sinfo >&2 || true
      tail -n 20 "$state/slurmctld.log" "$state/slurmd.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
  echo "Slurm is up: $(sinfo -h -o '%P %D %t %c CPUs')"
}

# A start right after a stop would find a daemon still saving its state, keep it, and be left
# with none: wait (bounded) until each is gone.
stop_and_wait() {
  local pid="$1" deadline=$((SECONDS + 30))
  kill "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
}

stop() {
  for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid"; do
    if [ -f "$pidfile" ]; then
      stop_and_wait "$(cat "$pidfile")"
      rm -f "$pidfile"
    fi
  done
  for pid in $(pgrep -x munged); do stop_and_wait "$pid"; done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
