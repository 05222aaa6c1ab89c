#!/usr/bin/env bash
# Healthy: this node trains, or is about to. Local rank 0 touches HEALTH_FILE as batches go by
# ({{ cookiecutter.package }}/health.py) and the launcher removes it when the node starts, so no
# file means the node is importing torch, waiting for the rendezvous or forming its first round
# (each bounded by its own timeout). A file HEALTH_TIMEOUT seconds old: no batch for that long,
# as when a rank is stuck in a collective. Compose's healthcheck and Kubernetes' liveness probe.
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
