#!/usr/bin/env bash
# Run SCRIPT under torchrun with a static rendezvous hosted by node 0 at MASTER_ADDR:MASTER_PORT.
#
# Static, not c10d: node ranks are fixed (the master is always node 0) and the store listens on
# MASTER_PORT itself, so scripts written for a plain MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE
# setup join the same store that torchrun's agents use.
set -o errexit -o nounset -o pipefail

SCRIPT="${SCRIPT:-train_dist.py}"
ARGS="${ARGS:-}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [ ! -f "$SCRIPT" ]; then
  echo "ERROR: SCRIPT '$SCRIPT' not found (paths are relative to the project folder, $(pwd))" >&2
  exit 2
fi

# torchrun sets one thread per process only with several processes per node; a 1-CPU container
# would otherwise run as many threads as the host has cores and crawl. Use the cgroup CPU limit.
cpu_limit() {
  local quota period
  if [ -r /sys/fs/cgroup/cpu.max ]; then
    read -r quota period </sys/fs/cgroup/cpu.max
  else
    quota="$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || echo max)"
    period="$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null || echo 100000)"
  fi
  if [ "$quota" = max ] || [ "$quota" = -1 ]; then
    nproc
  else
    echo $(( (quota + period - 1) / period ))
  fi
}
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  threads=$(( $(cpu_limit) / NPROC_PER_NODE ))
  export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

echo "node ${NODE_RANK:-0}/${NNODES} on $(hostname): torchrun ${SCRIPT} ${ARGS} (threads ${OMP_NUM_THREADS})"
# ARGS is split into words on purpose: it carries several arguments in one variable.
# shellcheck disable=SC2086
exec torchrun \
  --nnodes="$NNODES" \
  --node-rank="${NODE_RANK:-0}" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" \
  --master-port="${MASTER_PORT:-29500}" \
  --max-restarts="$MAX_RESTARTS" \
  "$SCRIPT" $ARGS
