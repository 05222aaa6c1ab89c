"""The launcher's nodes (python -m launcher) as the nodes of a job on this machine (127.0.0.1),
and its rendezvous service (python -m launcher.rendezvous), for the tests."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the shell running the tests may hold (inside a node's container, say).
UNSET = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOG_DIR",
    "DDP_BACKEND",
    "START_METHOD",
    "RDZV_HOST",
    "RDZV_ADDR",
    "NODE_MARKER",
    "JOB_COMPLETION_INDEX",
    "SLURM_PROCID",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(program="launcher", preexec=None, **env):
    """A module of the launcher (`python -m launcher`, or launcher.rendezvous) as one node, in the
    background (stdout and stderr merged), in its own process group: kill() ends it as `docker
    kill` ends a container. `preexec` runs in the child before the program (resource limits)."""
    inherited = {k: v for k, v in os.environ.items() if k not in UNSET}
    # The same on any render and machine (a GPU render's .env has nccl): CPU processes that
    # start as on every engine; a test that needs fork says so.
    fixed = {"START_METHOD": "spawn", "DDP_BACKEND": "gloo"}
    return subprocess.Popen(
        [sys.executable, "-m", program],
        cwd=ROOT,
        env={**inherited, **fixed, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec,
    )


def kill(process):
    """SIGKILL to the process and every process it started, as `docker kill` does."""
    os.killpg(process.pid, signal.SIGKILL)


class Node:
    """One node whose output is read as it comes, each line with the time it came."""

    def __init__(self, program="launcher", **env):
        self.environment = env  # what it was started with: a node to join it starts with the same
        self.process = start(program, **env)
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, pattern, timeout=120, after=0.0):
        """The time of the first line that matches `pattern` (and came `after` that time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if when >= after and re.search(pattern, line):
                    return when
            assert self.process.poll() is None or self._reader.is_alive(), self.output
            time.sleep(0.05)
        raise AssertionError(f"never saw {pattern!r}:\n{self.output[-3000:]}")

    def finish(self, timeout=300):
        """The exit status, once the node has ended."""
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.process.returncode

    @property
    def output(self):
        return "".join(line for _, line in self.lines)


# A node that joins the next round of a job and dies at once, without a word: what a `docker
# kill` at the instant a round completes leaves behind.
GHOST = """
import os, sys
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

endpoint, run_id, nodes, name = sys.argv[1:]
parameters = RendezvousParameters(
    "c10d", endpoint, run_id, int(nodes), int(nodes), local_addr=name, is_host=False
)
get_rendezvous_handler(parameters).next_rendezvous()
os._exit(0)  # its heartbeats stop, as a killed node's do
"""


def ghost(job, name):
    """The ghost node for the job a Node was started with (its environment); returns its
    process."""
    endpoint = f"{job['RDZV_ADDR']}:{job['RDZV_PORT']}"
    arguments = [endpoint, job["RUN_ID"], job["NODES"], name]
    return subprocess.Popen([sys.executable, "-c", GHOST, *arguments], cwd=ROOT)


def rendezvous(**job):
    """The rendezvous service for a job started with `job` (RDZV_PORT and RUN_ID), as a Node."""
    port, run_id = job["RDZV_PORT"], job["RUN_ID"]
    return Node("launcher.rendezvous", RDZV_PORT=port, RUN_ID=run_id, IDLE_TIMEOUT="30")
