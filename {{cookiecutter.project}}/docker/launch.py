"""Start one node of the job: decide its role, import torch, wait for the master, run torchrun.

Every engine starts a node with `python docker/launch.py`: Compose (the image's command),
Kubernetes, Slurm, Swarm, `make up-node` and `make train-local`. Settings come from the
environment; DEFAULTS holds the default of each. README, "How a node starts", says why each step.
"""

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULTS = {
    "SCRIPT": "train_dist.py",
    "ARGS": "",
    "NODE_ROLE": "",  # master or worker; empty: node_role() decides
    "MASTER_ADDR": "127.0.0.1",
    "RDZV_PORT": "29400",
    "NNODES": "1",
    "MIN_NODES": "1",
    "MAX_NODES": "",  # empty: NNODES
    "NPROC_PER_NODE": "1",
    "MAX_RESTARTS": "3",
    "RUN_ID": "ddp",
    "START_METHOD": "spawn",
    "WAIT_TIMEOUT": "60",
    "REJOIN_TIMEOUT": "10",
    "JOIN_TIMEOUT": "120",
    "LAST_CALL_TIMEOUT": "2",
    "RDZV_TIMEOUT": "30",
    "NODE_MARKER": "",  # the image sets one: a file that outlives a container restart
    "LOG_DIR": "",
    "LOCAL_ADDR": "",
    "DDP_BACKEND": "",
}
USAGE_ERROR = 2  # argparse's status, and train_dist.py's for data and folder errors
# train_dist.py's status on the ranks that stopped because a peer was asked to leave: the job
# re-forms without it, and that is no failure (README, "Elastic").
PEER_STOPPED = 75
# Where an engine numbers its nodes: Kubernetes' Indexed Job, Slurm's task id.
NODE_INDEX_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_PROCID")


def main():
    """The node's steps, in order (README, "How a node starts"); returns its exit status."""
    role = node_role()
    last = last_status(setting("NODE_MARKER"))
    if last == USAGE_ERROR:
        error("not restarting: the last run ended with a usage or data error (exit status 2)")
        return USAGE_ERROR
    script = checked_script()
    worker, restarted = role == "worker", last is not None
    # A restarted worker's master was up before: if it is gone now, exit before the import.
    if worker and restarted and not wait_for_master(int(setting("REJOIN_TIMEOUT"))):
        return 1
    prepare_processes(script)
    print(
        f"{role} {local_address(role)}: torchrun {setting('SCRIPT')} {setting('ARGS')} (nodes"
        f" {setting('MIN_NODES')}-{setting('NNODES')}, threads {os.environ['OMP_NUM_THREADS']},"
        f" {setting('START_METHOD')})",
        flush=True,
    )
    # The seconds-long import, before a first start's wait, so that the nodes' imports overlap.
    import torch.distributed.run  # noqa: F401

    if worker and not restarted and not wait_for_master(int(setting("WAIT_TIMEOUT"))):
        return 1
    return run_torchrun(role, torchrun_arguments(role, script))


def node_role():
    """master or worker: NODE_ROLE if set, else node 0 of the engine, else the node whose
    hostname is MASTER_ADDR (Compose's `master`, a PyTorchJob's `<job>-master-0`)."""
    role = setting("NODE_ROLE")
    if role:
        if role not in ("master", "worker"):
            raise Refused(f"NODE_ROLE must be master or worker, not '{role}'")
        return role
    for name in NODE_INDEX_VARIABLES:
        if name in os.environ:
            return "master" if os.environ[name] == "0" else "worker"
    local = (socket.gethostname(), "127.0.0.1", "localhost")
    return "master" if setting("MASTER_ADDR") in local else "worker"


def last_status(marker):
    """None on a container's first start; on a restart, the status its last run wrote."""
    if not marker:
        return None
    path = Path(marker)
    if not path.exists():
        path.touch()
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else 1  # no status: the last run was killed


def checked_script():
    """The script's absolute path, once the settings that would fail later are refused."""
    script = Path(setting("SCRIPT")).resolve()
    if not script.is_file():
        folder = os.getcwd()
        raise Refused(f"SCRIPT '{setting('SCRIPT')}' not found (paths are relative to {folder})")
    method = setting("START_METHOD")
    if method not in ("fork", "spawn"):
        raise Refused(f"START_METHOD must be fork or spawn, not '{method}'")
    if method == "fork" and setting("DDP_BACKEND") == "nccl":
        raise Refused("START_METHOD=fork cannot use CUDA (nccl): set START_METHOD=spawn")
    return script


def wait_for_master(timeout):
    """Bounded wait for the master's rendezvous port; False (with a message) if it never answers."""
    addr, port = setting("MASTER_ADDR"), int(setting("RDZV_PORT"))
    print(f"waiting for master {addr}:{port} (timeout {timeout}s)", flush=True)
    started = time.monotonic()
    while True:
        try:
            # Each try is bounded too: a connect to an address that drops packets can hang.
            with socket.create_connection((addr, port), timeout=2):
                break
        except OSError:
            if time.monotonic() - started >= timeout:
                error(f"master {addr}:{port} did not answer within {timeout}s")
                return False
            time.sleep(1)
    print(f"master {addr}:{port} is up after {time.monotonic() - started:.0f}s", flush=True)
    return True


def prepare_processes(script):
    """What the training processes inherit from this one."""
    # With --run-path (fork) the script runs in this interpreter, and `python script.py` would
    # put its folder first on sys.path.
    sys.path[0] = str(script.parent)
    if not os.environ.get("OMP_NUM_THREADS"):
        threads = cpu_limit() // int(setting("NPROC_PER_NODE"))
        os.environ["OMP_NUM_THREADS"] = str(max(threads, 1))
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"


def cpu_limit():
    """CPUs of this container's cgroup limit (cgroup v2 or v1), else of the machine."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except OSError:
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            quota, period = "max", "1"
    if quota in ("max", "-1"):
        # The CPUs this process may run on (a Slurm task's share); macOS has no affinity.
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return -(-int(quota) // int(period))


def local_address(role):
    """The address this node announces: c10d ranks nodes by it, and only the master's is dialed."""
    if setting("LOCAL_ADDR"):
        return setting("LOCAL_ADDR")
    return setting("MASTER_ADDR") if role == "master" else f"~worker-{socket.gethostname()}"


def max_nodes():
    return int(setting("MAX_NODES") or setting("NNODES"))


def torchrun_arguments(role, script):
    rdzv_conf = (
        f"is_host={int(role == 'master')},join_timeout={setting('JOIN_TIMEOUT')},"
        f"last_call_timeout={setting('LAST_CALL_TIMEOUT')},read_timeout={setting('RDZV_TIMEOUT')},"
        "keep_alive_interval=2,keep_alive_max_attempt=5"
    )
    start = ["--start-method=fork", "--run-path"] if setting("START_METHOD") == "fork" else []
    return [
        # All NNODES for the job's first round; once it has formed, run_torchrun widens every
        # node's sizes to MIN_NODES..MAX_NODES (README, "Elastic").
        f"--nnodes={setting('NNODES')}",
        f"--nproc-per-node={setting('NPROC_PER_NODE')}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={setting('MASTER_ADDR')}:{setting('RDZV_PORT')}",
        f"--rdzv-id={setting('RUN_ID')}",
        f"--rdzv-conf={rdzv_conf}",
        f"--local-addr={local_address(role)}",
        f"--max-restarts={setting('MAX_RESTARTS')}",
        "--monitor-interval=1",
        *start,
        str(script),
        *shlex.split(setting("ARGS")),
    ]


def run_torchrun(role, arguments):
    """torchrun's main() with the changes README's "Exit codes" and "Elastic" list; returns the
    node's status."""
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        _RendezvousJoinOp,
    )
    from torch.distributed.run import main

    # Private methods of torch's agent and rendezvous (torch is pinned); tests/test_launch.py
    # checks that they exist.
    monitor = LocalElasticAgent._monitor_workers
    rendezvous = LocalElasticAgent._rendezvous
    assign_ranks = LocalElasticAgent._assign_worker_ranks
    next_rendezvous = DynamicRendezvousHandler.next_rendezvous
    join = _RendezvousJoinOp.__call__
    joined, members = [], set()  # the handler and the nodes of the last round it joined

    def monitor_with_exit_codes(agent, worker_group):
        result = monitor(agent, worker_group)
        codes = {f.exitcode for f in result.failures.values()} if result.is_failed() else set()
        if USAGE_ERROR in codes:
            agent._remaining_restarts = 0
        elif codes == {PEER_STOPPED}:
            # A membership change, which torch does not count either when a node joins.
            agent._remaining_restarts += 1
            print(
                "torchrun: a node left or joins: the job re-forms, no restart counted", flush=True
            )
        return result

    def join_at_any_size_once_formed(op, context, deadline):
        # Each node applies its own sizes to the shared state, so all must hold the same ones,
        # decided by that state, not by how the node was started. A node started for a running
        # job with other sizes (make scale's NNODES, a replacement with the job's NNODES) could
        # clear the last call the others waited for when a node left a forming round, so the
        # round never formed (a chaos run in CI); with NNODES as its maximum it waited in torch's
        # redundancy list and was never taken in.
        state = context.state
        if state.complete or state.round > 0:
            settings = context.settings  # frozen; shared with the handler and its heartbeats
            object.__setattr__(settings, "min_nodes", min(int(setting("MIN_NODES")), max_nodes()))
            object.__setattr__(settings, "max_nodes", max_nodes())
        return join(op, context, deadline)

    def a_member_is_gone():
        return not members <= set(joined[0]._state_holder.state.participants)

    def assign_ranks_between_heartbeats(agent, store, *rest):
        polled = PolledStore(store, int(setting("RDZV_TIMEOUT")), a_member_is_gone)
        return assign_ranks(agent, polled, *rest)

    def rendezvous_again_if_a_member_is_gone(agent, worker_group):
        # After each round the agents swap their process counts through the store; a node that
        # died between the round and its write (a kill at that instant) left the others waiting
        # RDZV_TIMEOUT and then ended their agents, and so the job, on DistStoreError.
        while True:
            try:
                return rendezvous(agent, worker_group)
            except DistStoreError:
                if agent._remaining_restarts <= 0:
                    raise
                agent._remaining_restarts -= 1
                print("torchrun: a node of the new round is gone: forming another", flush=True)

    def remember_the_handler(handler):
        info = next_rendezvous(handler)
        joined[:] = [handler]
        members.clear()
        members.update(handler._state_holder.state.participants)
        return info

    def leave_without_closing(handler):
        handler._stop_heartbeats()
        return True

    LocalElasticAgent._monitor_workers = monitor_with_exit_codes
    LocalElasticAgent._rendezvous = rendezvous_again_if_a_member_is_gone
    LocalElasticAgent._assign_worker_ranks = assign_ranks_between_heartbeats
    DynamicRendezvousHandler.next_rendezvous = remember_the_handler
    _RendezvousJoinOp.__call__ = join_at_any_size_once_formed
    if role == "worker":
        DynamicRendezvousHandler.shutdown = leave_without_closing
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(WithoutTraceback())
    try:
        main(arguments)
        return 0
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code = failure.exitcode
        status = code if code > 0 else 128 - code if code < 0 else 1
        reason = "a usage or data error: not restarted" if status == USAGE_ERROR else "failed"
        print(f"torchrun: rank {rank} exited with status {code} ({reason})", flush=True)
        return status
    except SignalException as error:
        # Stopped (docker stop, make down, make scale, an eviction): the ranks saved where they
        # stopped. A worker leaves the rendezvous so that the others re-form at once.
        if role == "worker" and joined:
            leave(joined[0])
        print(f"torchrun: stopped by {error.sigval.name}", flush=True)
        return 128 + error.sigval


def leave(handler):
    """Take this node out of the rendezvous' participants, as a node does before it joins a new
    round: the others then re-form without waiting for its heartbeats to time out."""
    from datetime import timedelta

    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _RendezvousExitOp

    handler._stop_heartbeats()
    try:
        with handler._heartbeat_lock:
            # Short: a master that is stopping too (make down) must not hold up the exit.
            deadline = handler._get_deadline(timedelta(seconds=5))
            handler._op_executor.run(_RendezvousExitOp(), deadline)
        print("left the rendezvous", flush=True)
    except Exception as failure:  # the master may be gone already: its heartbeats time out
        name = type(failure).__name__
        print(f"could not leave the rendezvous ({name}): the others drop it later", flush=True)


class PolledStore:
    """The round's store for torch's exchange of process counts, waiting for keys in short polls.

    The node's heartbeats use the same connection, and each store call holds it: a blocking wait
    for a lost node's key silenced them, the others dropped this node after 10 s and formed a
    round without it (the master: rank 0 then at an address no one can dial). The exchange calls
    set, multi_set, get and multi_get (torch's agent, `_assign_worker_ranks`). The wait ends
    early once the heartbeats have dropped a node of the round: its key will never come.
    """

    def __init__(self, store, timeout_s, a_member_is_gone):
        self.store, self.timeout_s, self.a_member_is_gone = store, timeout_s, a_member_is_gone

    def set(self, key, value):
        self.store.set(key, value)

    def multi_set(self, keys, values):
        self.store.multi_set(keys, values)

    def get(self, key):
        self.wait([key])
        return self.store.get(key)

    def multi_get(self, keys):
        self.wait(keys)
        return self.store.multi_get(keys)

    def wait(self, keys):
        from torch.distributed import DistStoreError

        deadline = time.monotonic() + self.timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline or self.a_member_is_gone():
                raise DistStoreError(f"a node of the round never wrote one of {keys}")
            time.sleep(0.05)


class WithoutTraceback(logging.Filter):
    """torchrun logs a failed process with its own traceback, which says nothing about the
    script; the line naming the process and its exit code stays, but for PEER_STOPPED."""

    def filter(self, record):
        record.exc_info = record.exc_text = None
        # Not a failure: run_torchrun says what it is.
        return f"(exitcode: {PEER_STOPPED})" not in record.getMessage()


def setting(name):
    return os.environ.get(name) or DEFAULTS[name]


def error(message):
    print(f"ERROR: {message}", file=sys.stderr, flush=True)


class Refused(Exception):
    """A setting that cannot work: the node exits with USAGE_ERROR and this message."""


def copy_output_to(log_dir):
    """Everything this node prints also goes to LOG_DIR/node-<hostname>.log; returns the tee."""
    if not (log_dir and os.path.isdir(log_dir) and os.access(log_dir, os.W_OK)):
        return None
    path = os.path.join(log_dir, f"node-{socket.gethostname()}.log")
    # Its own session: a Ctrl-C meant for training must not end the copy before the last lines.
    tee = subprocess.Popen(["tee", "-a", path], stdin=subprocess.PIPE, start_new_session=True)
    for fd in (1, 2):
        os.dup2(tee.stdin.fileno(), fd)
    return tee


def end_copy(tee):
    """Let the copy write its last lines before the container ends with this process."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.close(1)
    os.close(2)
    tee.stdin.close()
    tee.wait(timeout=10)


if __name__ == "__main__":
    tee = copy_output_to(setting("LOG_DIR"))
    try:
        status = main()
    except Refused as refused:
        error(refused)
        status = USAGE_ERROR
    marker = setting("NODE_MARKER")
    if marker and os.path.exists(marker):
        Path(marker).write_text(f"{status}\n")
    if tee:
        end_copy(tee)
    sys.exit(status)
