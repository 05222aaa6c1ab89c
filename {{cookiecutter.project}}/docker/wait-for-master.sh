#!/usr/bin/env bash
# Wait (bounded) until the master's rendezvous port answers; exit 1 with a message naming the
# host, port and timeout if it does not.
set -o errexit -o nounset -o pipefail

MASTER_ADDR="${MASTER_ADDR:-master}"
RDZV_PORT="${RDZV_PORT:-29400}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}"

started=$SECONDS
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
