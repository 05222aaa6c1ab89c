#!/usr/bin/env bash
# Wait (bounded) for the master's rendezvous port unless this node is the master, then run the
# command. The master is the node whose hostname is MASTER_ADDR, or any node with NODE_ROLE=master.
set -o errexit -o nounset -o pipefail

MASTER_ADDR="${MASTER_ADDR:-master}"
RDZV_PORT="${RDZV_PORT:-29400}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}"
REJOIN_TIMEOUT="${REJOIN_TIMEOUT:-10}"

# A restarted container keeps its files: a marker tells a restart from a first start. On a
# restart the master was up before, so a master that does not answer soon is gone for good.
marker=/tmp/.node-started
if [ -e "$marker" ]; then
  WAIT_TIMEOUT="$REJOIN_TIMEOUT"
fi
touch "$marker"

if [ -z "${NODE_ROLE:-}" ]; then
  if [ "$(hostname)" = "$MASTER_ADDR" ]; then NODE_ROLE=master; else NODE_ROLE=worker; fi
fi
export NODE_ROLE MASTER_ADDR RDZV_PORT

wait_for_master() {
  local started=$SECONDS
  echo "waiting for master ${MASTER_ADDR}:${RDZV_PORT} (timeout ${WAIT_TIMEOUT}s)"
  # Each try is bounded too: a connect to an address that drops packets can hang for minutes.
  until timeout 2 bash -c ": >/dev/tcp/${MASTER_ADDR}/${RDZV_PORT}" 2>/dev/null; do
    if (( SECONDS - started >= WAIT_TIMEOUT )); then
      echo "ERROR: master ${MASTER_ADDR}:${RDZV_PORT} did not answer within ${WAIT_TIMEOUT}s" >&2
      exit 1
    fi
    sleep 1
  done
  echo "master ${MASTER_ADDR}:${RDZV_PORT} is up after $(( SECONDS - started ))s"
}

if [ "$NODE_ROLE" != master ]; then
  wait_for_master
fi
exec "$@"
