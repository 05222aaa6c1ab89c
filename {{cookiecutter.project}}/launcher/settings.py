"""The node's settings: the knobs (README's table), from the environment, else from the project's
.env; and the engine's own settings, with defaults that fit a one-node job on the host. This
module imports nothing heavy: k8s/render.py reads KNOBS from it."""

import functools
import os
import sys
from pathlib import Path

# The knobs (README's table). Their defaults are in the project's .env and nowhere else: every
# engine passes them to its nodes (Compose's environment, the Kubernetes ConfigMap), and a node
# started without them on the host (Slurm, `python -m launcher`) reads .env itself.
KNOBS = (
    "SCRIPT",
    "ARGS",
    "RDZV_PORT",
    "NODES",
    "MIN_NODES",
    "MAX_NODES",
    "NPROC_PER_NODE",
    "MAX_RESTARTS",
    "START_METHOD",
    "DDP_BACKEND",
    "WAIT_TIMEOUT",
    "REJOIN_TIMEOUT",
    "JOIN_TIMEOUT",
    "LAST_CALL_TIMEOUT",
    "RDZV_TIMEOUT",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_MISSES",
    "HEALTH_TIMEOUT",  # read by docker/healthcheck.sh
)
# What each engine sets for its own nodes; the defaults fit a one-node job on the host.
ENGINE = {
    "RDZV_ADDR": "127.0.0.1",  # the rendezvous service (launcher/rendezvous.py)
    "RDZV_HOST": "",  # 1: this node hosts the store itself (a one-node job on the host)
    "RUN_ID": "ddp",
    "NODE_MARKER": "",  # the image sets one: a file that outlives a container restart
    "HEALTH_FILE": "",  # the image sets one: docker/healthcheck.sh reads its age
    "LOG_DIR": "",
    "LOCAL_ADDR": "",  # empty: this node's address on the way to the rendezvous service
}
ENV_FILE = Path(__file__).resolve().parents[1] / ".env"


def setting(name):
    """A knob from the environment, else from .env; an engine's own setting, else its default."""
    if name in ENGINE:
        return os.environ.get(name) or ENGINE[name]
    # Set but empty (ARGS= on the make command line, in an image with no .env) is a value too.
    value = os.environ.get(name) or env_file().get(name, os.environ.get(name))
    if value is None:
        raise Refused(f"{name} is not set: pass it to every node, or run beside the project's .env")
    return value


def env_file():
    """The project's .env (KEY=value lines); empty where there is none (an image)."""
    return read_env_file(ENV_FILE)


@functools.cache
def read_env_file(path):
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, equals, value = line.partition("=")
            if equals and not key.startswith("#"):
                values[key.strip()] = value.strip()
    return values


def error(message):
    print(f"ERROR: {message}", file=sys.stderr, flush=True)


class Refused(Exception):
    """A setting that cannot work: the node exits with USAGE_ERROR and this message."""
