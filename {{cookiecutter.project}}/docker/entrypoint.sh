#!/usr/bin/env bash
# Work out this node's rank, wait (bounded) for the master's rendezvous port, then run the command.
set -o errexit -o nounset -o pipefail

MASTER_ADDR="${MASTER_ADDR:-master}"
MASTER_PORT="${MASTER_PORT:-29500}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}"

# The master is node 0 by name. A Compose worker replica is named <project>-worker-<n>, n = 1, 2,
# ...; the container's hostname is its ID, so the name comes from Docker's DNS (reverse lookup of
# its own address), which /etc/hosts would otherwise answer with the ID.
node_rank() {
  if [ "$(hostname)" = "$MASTER_ADDR" ]; then
    echo 0
    return
  fi
  local address name
  address="$(hostname -i | awk '{print $1}')"
  name="$(getent -s dns hosts "$address" | awk '{print $2}')" || true
  if [[ "$name" =~ -worker-([0-9]+)(\.|$) ]]; then
    echo "${BASH_REMATCH[1]}"
    return
  fi
  echo "ERROR: cannot tell this node's rank from its name '${name:-?}': set NODE_RANK" >&2
  return 1
}

wait_for_master() {
  local started=$SECONDS
  echo "waiting for master ${MASTER_ADDR}:${MASTER_PORT} (timeout ${WAIT_TIMEOUT}s)"
  # Each try is bounded too: a connect to an address that drops packets can hang for minutes.
  until timeout 2 bash -c ": >/dev/tcp/${MASTER_ADDR}/${MASTER_PORT}" 2>/dev/null; do
    if (( SECONDS - started >= WAIT_TIMEOUT )); then
      echo "ERROR: master ${MASTER_ADDR}:${MASTER_PORT} did not answer within ${WAIT_TIMEOUT}s" >&2
      exit 1
    fi
    sleep 1
  done
  echo "master ${MASTER_ADDR}:${MASTER_PORT} is up after $(( SECONDS - started ))s"
}

if [ -z "${NODE_RANK:-}" ]; then
  NODE_RANK="$(node_rank)"
fi
export NODE_RANK MASTER_ADDR MASTER_PORT
if [ "$NODE_RANK" != 0 ]; then
  wait_for_master
fi
exec "$@"
