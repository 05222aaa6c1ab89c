#!/usr/bin/env bash
# Decide this node's role, make a worker wait (bounded) for the master, then run the command.
# The master is the node whose hostname is MASTER_ADDR, or any node with NODE_ROLE=master.
set -o errexit -o nounset -o pipefail

MASTER_ADDR="${MASTER_ADDR:-master}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}"
REJOIN_TIMEOUT="${REJOIN_TIMEOUT:-10}"

# A restarted container keeps its files: a marker tells a restart from a first start. On a
# restart the master was up before, so a master that does not answer soon is gone for good.
# The launcher writes its exit status there: a usage or data error (2) fails the same way again.
marker="${NODE_MARKER:-/tmp/.node-started}"
restarted=0
if [ -e "$marker" ]; then
  restarted=1
  WAIT_TIMEOUT="$REJOIN_TIMEOUT"
  if [ "$(cat "$marker")" = 2 ]; then
    echo "not restarting: the last run ended with a usage or data error (exit status 2)" >&2
    exit 2
  fi
fi
touch "$marker"

if [ -z "${NODE_ROLE:-}" ]; then
  if [ "$(hostname)" = "$MASTER_ADDR" ]; then NODE_ROLE=master; else NODE_ROLE=worker; fi
fi
export NODE_ROLE MASTER_ADDR WAIT_TIMEOUT

# On a first start the launcher waits for the master itself, after importing torch
# (docker/torchrun.py): waiting here first would start a worker's import only once the master's
# was done, adding the two. A restarted worker waits here: if the master is gone, it exits
# without paying for the import.
if [ "$NODE_ROLE" != master ]; then
  if [ "$restarted" = 1 ] || [ "$(basename "${1:-}")" != launch.sh ]; then
    "$(dirname "$0")/wait-for-master.sh"
  fi
fi
exec "$@"
