#!/usr/bin/env bash
# Healthy: this node trains, or is about to. Local rank 0 touches HEALTH_FILE as batches go by
# ({{ cookiecutter.package }}/health.py); the launcher removes it when the node starts, and local
# rank 0 when its round starts and before each checkpoint save, so no file means a phase bounded
# by its own timeout (torch's import, the rendezvous, a round, a checkpoint). A file
# HEALTH_TIMEOUT seconds old: no batch for that long, as when a rank is stuck. Compose's
# healthcheck and Kubernetes' liveness probe.
set -o errexit -o nounset -o pipefail
file="${HEALTH_FILE:?is set by the image}"
limit="${HEALTH_TIMEOUT:?is passed from .env}"
if [ ! -f "$file" ]; then
  echo "starting: no batch yet"
  exit 0
fi
age=$(( $(date +%s) - $(stat -c %Y "$file") ))
if [ "$age" -ge "$limit" ]; then
  echo "no batch for ${age}s (HEALTH_TIMEOUT=$limit)"
  exit 1
fi
echo "training: last batch ${age}s ago"
