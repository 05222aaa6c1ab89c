#!/usr/bin/env bash
# Run SCRIPT under torchrun, elastic: a c10d rendezvous whose store the master hosts on
# MASTER_ADDR:RDZV_PORT, between MIN_NODES and NNODES nodes, with MAX_RESTARTS restarts.
#
# Ranks: c10d sorts nodes by the address they announce. The master announces MASTER_ADDR (the
# address the others reach it at); workers announce "~worker-<hostname>", which no one dials and
# which sorts after any host name or IP ('~' follows letters and digits): the master is always
# node 0 and holds rank 0.
#
# Stores: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes rank 0 of every round host a fresh store
# for the process group, instead of reusing one across rounds, where keys left by the round
# before (a dead rank's address) break the next one after a node is lost. It also lets scripts
# written for a plain MASTER_ADDR=master/MASTER_PORT=29500 setup run unchanged: their rank 0
# hosts the store on 29500, which the rendezvous (RDZV_PORT) leaves free.
#
# Start-up: importing torch costs seconds of CPU. With START_METHOD=fork (.env's default on CPU)
# the training processes are forked from torchrun's agent, which has imported torch already, and
# run the script in that interpreter (--run-path): one import per node instead of two. spawn, the
# default here and torchrun's, starts a fresh interpreter per process: needed for CUDA, which the
# agent initialises and a forked process then cannot use, and for scripts that rely on atexit
# handlers, which a forked process does not run.
set -o errexit -o nounset -o pipefail

SCRIPT="${SCRIPT:-train_dist.py}"
ARGS="${ARGS:-}"
NNODES="${NNODES:-1}"
MIN_NODES="${MIN_NODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
RDZV_PORT="${RDZV_PORT:-29400}"
RUN_ID="${RUN_ID:-ddp}"
START_METHOD="${START_METHOD:-spawn}"
# Seconds the first node waits for the others, and then for stragglers once MIN_NODES are in;
# a store that does not answer for RDZV_TIMEOUT seconds (the master is gone) ends the job.
JOIN_TIMEOUT="${JOIN_TIMEOUT:-120}"
LAST_CALL_TIMEOUT="${LAST_CALL_TIMEOUT:-20}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-30}"
# A node that misses 5 heartbeats 2 s apart is dropped from the rendezvous (torch's default: 15 s).
RDZV_CONF="join_timeout=${JOIN_TIMEOUT},last_call_timeout=${LAST_CALL_TIMEOUT}"
RDZV_CONF+=",read_timeout=${RDZV_TIMEOUT},keep_alive_interval=2,keep_alive_max_attempt=5"

if [ ! -f "$SCRIPT" ]; then
  echo "ERROR: SCRIPT '$SCRIPT' not found (paths are relative to the project folder, $(pwd))" >&2
  exit 2
fi

case "$START_METHOD" in
  fork)
    if [ "${DDP_BACKEND:-}" = nccl ]; then
      echo "ERROR: START_METHOD=fork cannot use CUDA (nccl): set START_METHOD=spawn" >&2
      exit 2
    fi
    # --run-path wants an absolute path; the script's folder goes first on sys.path.
    script="$(realpath "$SCRIPT")"
    PYTHONPATH="$(dirname "$script")${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
    start=(--start-method=fork --run-path)
    ;;
  spawn)
    script="$SCRIPT"
    start=()
    ;;
  *)
    echo "ERROR: START_METHOD must be fork or spawn, not '$START_METHOD'" >&2
    exit 2
    ;;
esac

if [ "${NODE_ROLE:-master}" = master ]; then
  is_host=1
  local_addr="${LOCAL_ADDR:-$MASTER_ADDR}"
else
  is_host=0
  local_addr="${LOCAL_ADDR:-~worker-$(hostname)}"
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

# Everything this node prints also goes to the host's logs/ folder, one file per node.
if [ -n "${LOG_DIR:-}" ] && [ -d "$LOG_DIR" ] && [ -w "$LOG_DIR" ]; then
  exec > >(tee -a "${LOG_DIR}/node-$(hostname).log") 2>&1
fi

export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "${NODE_ROLE:-master} ${local_addr}: torchrun ${SCRIPT} ${ARGS} (nodes ${MIN_NODES}-${NNODES}, threads ${OMP_NUM_THREADS}, ${START_METHOD})"
# ARGS is split into words on purpose: it carries several arguments in one variable.
# shellcheck disable=SC2086
exec python "$(dirname "$0")/torchrun.py" \
  --nnodes="${MIN_NODES}:${NNODES}" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR}:${RDZV_PORT}" \
  --rdzv-id="$RUN_ID" \
  --rdzv-conf="is_host=${is_host},${RDZV_CONF}" \
  --local-addr="$local_addr" \
  --max-restarts="$MAX_RESTARTS" \
  --monitor-interval=1 \
  "${start[@]}" \
  "$script" $ARGS
