"""One node of the job: wait for the rendezvous service, then run torchrun with the patches.

Every engine starts a training node with `python -m launcher` (this module's `run`): Compose
(the image's command), Kubernetes, Slurm, Swarm, `make up-node` and `make train-local`. The
nodes are alike: the rendezvous store runs apart (launcher/rendezvous.py), and rank 0 is
whichever node a round makes it. docs/how-a-node-starts.md says why each step;
launcher/patches.py holds the changes to torch.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from {{ cookiecutter.package }}.errors import USAGE_ERROR

from .settings import Refused, error, setting


def main():
    """The node's steps, in order (docs/how-a-node-starts.md); returns its exit status."""
    last = last_status(setting("NODE_MARKER"))
    if last == USAGE_ERROR:
        error("not restarting: the last run ended with a usage or data error (exit status 2)")
        return USAGE_ERROR
    script = checked_script()
    # The last run's heartbeat would date this one: until a batch, the node is starting.
    if setting("HEALTH_FILE"):
        Path(setting("HEALTH_FILE")).unlink(missing_ok=True)
    hosting, restarted = setting("RDZV_HOST") == "1", last is not None
    # A restarted node's job was running before: if its rendezvous is gone now (the job has
    # ended), exit before the import, with the status that ended the node's last run.
    if restarted and not hosting and not wait_for_rendezvous(int(setting("REJOIN_TIMEOUT"))):
        return last
    prepare_processes(script)
    print(
        f"node {local_address()}: torchrun {setting('SCRIPT')} {setting('ARGS')} (nodes"
        f" {setting('MIN_NODES')}-{setting('NODES')}, threads {os.environ['OMP_NUM_THREADS']},"
        f" {setting('START_METHOD')})",
        flush=True,
    )
    # The seconds-long import, before a first start's wait, so that the nodes' imports overlap.
    # The agent's C++ store client logs each failed call to a lost rendezvous service with its
    # stack (a page per node); run_torchrun says it in one line. Ranks started by spawn keep
    # the user's level; forked ones share the agent's.
    user_level = os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    import torch.distributed.run  # noqa: F401

    del os.environ["TORCH_CPP_LOG_LEVEL"]
    if user_level:
        os.environ["TORCH_CPP_LOG_LEVEL"] = user_level

    if not (hosting or restarted) and not wait_for_rendezvous(int(setting("WAIT_TIMEOUT"))):
        return 1
    if not hosting and not sign_in() and restarted:
        return last  # the job ended while this node restarted: its service is gone
    return run_torchrun(torchrun_arguments(script))


SIGNED = []  # this node on the service's roll (launcher/roll.py), once signed in


def sign_in():
    """Put this node on the rendezvous service's roll, so that the service outlives it once the
    job has ended (it may still read how the job ended there); False where the service is gone."""
    from .roll import Signed, service_store

    store = service_store(*rendezvous_endpoint())
    if store is None:
        return False
    try:
        SIGNED.append(Signed(store, setting("RUN_ID"), local_address()))
    except Exception:  # noqa: BLE001 - the service ended meanwhile
        return False
    return True


def node_status(code):
    """A training process's exit code as a shell reports it: torch gives a process killed by
    signal N as -N, which is 128+N (137: SIGKILL); 0 for a failure means torch saw no code."""
    return code if code > 0 else 128 - code if code < 0 else 1


def last_status(marker):
    """None on a container's first start; on a restart, the status its last run wrote."""
    if not marker:
        return None
    path = Path(marker)
    if not path.exists():
        path.touch()
        return None
    text = path.read_text().strip()
    return int(text) if text.isdigit() else 137  # no status: the last run was killed


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
    low, high = setting("MIN_NODES"), setting("MAX_NODES")
    if not (low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise Refused(f"MIN_NODES ({low}) must be 1 to MAX_NODES ({high})")
    return script


def first_round():
    """The job's first round: all NODES, or MAX_NODES where more nodes were started (the rest
    wait as spares, launcher/patches.py)."""
    return min(int(setting("NODES")), int(setting("MAX_NODES")))


def rendezvous_endpoint():
    return setting("RDZV_ADDR"), int(setting("RDZV_PORT"))


def wait_for_rendezvous(timeout):
    """Bounded wait for the rendezvous service; False (with a message) if it never answers."""
    addr, port = rendezvous_endpoint()
    print(f"waiting for the rendezvous service {addr}:{port} (timeout {timeout}s)", flush=True)
    started = time.monotonic()
    while True:
        try:
            # Each try is bounded too: a connect to an address that drops packets can hang.
            with socket.create_connection((addr, port), timeout=2):
                break
        except OSError:
            if time.monotonic() - started >= timeout:
                error(f"the rendezvous service {addr}:{port} did not answer within {timeout}s")
                return False
            # Often a moment: the service imports torch as the nodes do, and the nodes wait for
            # it; a connect that fails costs nothing.
            time.sleep(0.2)
    print(f"rendezvous {addr}:{port} is up after {time.monotonic() - started:.0f}s", flush=True)
    return True


def prepare_processes(script):
    """What the training processes inherit from this one."""
    # With --run-path (fork) the script runs in this interpreter, and `python script.py` would
    # put its folder first on sys.path.
    sys.path[0] = str(script.parent)
    if not os.environ.get("OMP_NUM_THREADS"):
        threads = cpu_limit() // processes()
        os.environ["OMP_NUM_THREADS"] = str(max(threads, 1))
    # launcher/patches.py says why.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"


def processes(gpus=None):
    """NPROC_PER_NODE as a number; `gpu`: one process per GPU this node sees (`gpus`, else
    torch's count). With nccl, more processes than GPUs would put two ranks on one GPU, which
    nccl refuses only once the job has started: refused here, before training."""
    value, nccl = setting("NPROC_PER_NODE"), setting("DDP_BACKEND") == "nccl"
    if value != "gpu" and not (value.isdigit() and int(value) >= 1):
        raise Refused(f"NPROC_PER_NODE must be a whole number >= 1 or gpu, not '{value}'")
    if value != "gpu" and not nccl:
        return int(value)
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()  # NVML or the driver: no CUDA context in this process
    if gpus == 0:
        raise Refused(
            f"NPROC_PER_NODE={value}, DDP_BACKEND={setting('DDP_BACKEND')}: this node"
            " sees no GPU (GPUS, or the engine's GPU request)"
        )
    if value == "gpu":
        return gpus
    if nccl and int(value) > gpus:
        raise Refused(
            f"NPROC_PER_NODE={value} on {gpus} GPU(s): nccl cannot share a GPU between ranks;"
            " set NPROC_PER_NODE=gpu (one process per GPU)"
        )
    return int(value)


def cpu_limit(cgroup=Path("/sys/fs/cgroup")):
    """CPUs of this container's cgroup limit (cgroup v2 or v1), else of the machine."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except OSError:
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            quota, period = "max", "1"
    if quota in ("max", "-1"):
        # The CPUs this process may run on (a Slurm task's share); macOS has no affinity.
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return -(-int(quota) // int(period))


def local_address():
    """The address this node announces: when a round makes it rank 0, the other nodes' ranks
    dial it. By default the address of the interface that reaches the rendezvous service."""
    if setting("LOCAL_ADDR"):
        return setting("LOCAL_ADDR")
    try:
        # A UDP connect sends nothing: it only picks the route.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(rendezvous_endpoint())
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


def torchrun_arguments(script):
    from .patches import BACKEND  # imports torch, as main() has by now

    rdzv_conf = (
        f"is_host={int(setting('RDZV_HOST') == '1')},join_timeout={setting('JOIN_TIMEOUT')},"
        f"last_call_timeout={setting('LAST_CALL_TIMEOUT')},read_timeout={setting('RDZV_TIMEOUT')},"
        f"keep_alive_interval={setting('HEARTBEAT_INTERVAL')},"
        f"keep_alive_max_attempt={setting('HEARTBEAT_MISSES')}"
    )
    start = ["--start-method=fork", "--run-path"] if setting("START_METHOD") == "fork" else []
    addr, port = rendezvous_endpoint()
    return [
        # All NODES (up to MAX_NODES) for the job's first round; once it has formed, patches widens
        # every node's sizes to MIN_NODES..MAX_NODES (docs/elastic.md).
        f"--nnodes={first_round()}",
        f"--nproc-per-node={processes()}",
        f"--rdzv-backend={BACKEND}",
        f"--rdzv-endpoint={addr}:{port}",
        f"--rdzv-id={setting('RUN_ID')}",
        f"--rdzv-conf={rdzv_conf}",
        f"--local-addr={local_address()}",
        f"--max-restarts={setting('MAX_RESTARTS')}",
        # How soon the agent sees its ranks fail (a lost peer): a poll of its processes and
        # of the rendezvous state, which is cached for POLL_S (launcher/patches.py).
        "--monitor-interval=0.1",
        *start,
        str(script),
        *shlex.split(setting("ARGS")),
    ]


def run_torchrun(arguments):
    """torchrun's main() with launcher/patches.py's changes; returns the node's status."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousTimeoutError,
    )
    from torch.distributed.run import main

    from . import patches

    warning = patches.version_warning()
    if warning:
        print(warning, flush=True)
    sizes = int(setting("MIN_NODES")), int(setting("MAX_NODES"))
    forks = setting("START_METHOD") == "fork"
    node = patches.install(*sizes, int(setting("RDZV_TIMEOUT")), forks=forks)
    try:
        main(arguments)
        record_verdict(0)
        return 0
    except ChildFailedError as failed:
        rank, message, status = first_failure(failed.failures)
        report_failure(rank, message, status)
        record_verdict(status)
        return status
    except SignalException as stopped:
        # Stopped (docker stop, make down, make scale, an eviction): the ranks saved where they
        # stopped. The node leaves the rendezvous so that the others re-form at once.
        if node.handler and setting("RDZV_HOST") != "1":
            patches.leave(node.handler)
        print(f"torchrun: stopped by {stopped.sigval.name}", flush=True)
        return 128 + stopped.sigval
    except RendezvousClosedError:
        # Closed by the node that ended the job, which recorded its status: this node, still on
        # its way in, reports the job's status (the job may have finished without it).
        return ended_without_this_node()
    except AttributeError as err:
        # A spare when the job ended: torch's agent returns no result after its
        # RendezvousGracefulExitError, and torch's launch_agent reads one (`result.is_failed()`).
        if not (node.spare and "is_failed" in str(err)):
            raise
        return ended_without_this_node()
    except RendezvousTimeoutError:
        error(
            f"no round of {setting('NODES')} nodes formed within {setting('JOIN_TIMEOUT')}s:"
            " a node did not come, or two nodes announce the same address (set LOCAL_ADDR)"
        )
        return 1
    except RendezvousConnectionError:
        addr, port = rendezvous_endpoint()
        if setting("RDZV_HOST") == "1":
            error(f"could not host the rendezvous store on port {port}: is it in use? (RDZV_PORT)")
            return 1
        error(
            f"lost the rendezvous service {addr}:{port}: this node stops; the next start"
            " resumes from the last checkpoint"
        )
        return 1


def first_failure(failures):
    """(rank, its error file's message or {}, status) of the rank that failed first, among
    torch's failures (every local rank that left an error file: launcher/patches.py), by the
    time train_dist.py records to the microsecond (torch keeps whole seconds, and the peer of a
    failed rank fails within the same one), then in the order torch found them. torch's own stop
    of the other ranks after the first failure is never the cause: a SIGTERM with no error file
    (killed, or ended by train_dist.py with 143), or a SignalException (CI saw each named as the
    cause once)."""

    def when(item):
        order, (rank, failure) = item
        message = failure.message if isinstance(failure.message, dict) else {}
        extra = message.get("extraInfo") or {}
        stopped = str(message.get("message", "")).startswith("SignalException") or (
            failure.exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM) and not message
        )
        return stopped, float(extra.get("time", failure.timestamp)), order

    _, (rank, failure) = min(enumerate(failures.items()), key=when)
    message = failure.message if isinstance(failure.message, dict) else {}
    return rank, message, node_status(failure.exitcode)


def report_failure(rank, message, status):
    """The first failing rank's traceback (from its error file: train_dist.py records an
    unexpected exception there, whatever the start method), then one line naming the rank, this
    node and the exception; both printed once, and in LOG_DIR/train.log."""
    message = message if isinstance(message, dict) else {}
    callstack = (message.get("extraInfo") or {}).get("py_callstack", "").rstrip()
    error = message.get("message", "")
    if status == USAGE_ERROR:
        what = "a usage or data error: not restarted (its message is above)"
    elif status > 128:
        what = f"killed by signal {status - 128}"
    else:
        what = error or "failed"
    line = f"torchrun: rank {rank} on node {local_address()} exited with status {status}: {what}"
    report = f"{callstack}\n{line}" if callstack else line
    print(report, flush=True)
    # LOG_DIR in an image; train_dist.py's own default, logs/, on the host (make train-local).
    log_dir = setting("LOG_DIR") or "logs"
    if callstack and os.path.isdir(log_dir):
        try:
            with open(os.path.join(log_dir, "train.log"), "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} [{socket.gethostname()} node] {report}\n")
        except OSError:
            pass  # printed already: the log folder is a copy


def ended_without_this_node():
    """The job's status, as the node that ended it recorded it, for a node never taken in."""
    verdict = read_verdict()
    if verdict == 0:
        print("the job finished before this node was taken in: nothing to do", flush=True)
        return 0
    error(f"the job ended with status {verdict or 'unknown'} before this node was taken in")
    return verdict or 1


def verdict_store():
    """A client of the rendezvous service's store; None where it cannot be reached."""
    from .roll import service_store

    if setting("RDZV_HOST") == "1":
        return None  # the store ended with this node's agent
    return service_store(*rendezvous_endpoint())


VERDICT_KEY = "ddp-template/verdict/"


def record_verdict(status):
    """The job's status, from a node that ended it (torch closed the rendezvous): a failure
    replaces a success, never the other way round."""
    store = verdict_store()
    if store is None:
        return
    key = VERDICT_KEY + setting("RUN_ID")
    try:
        if status:
            store.set(key, str(status))
        else:
            store.compare_set(key, "", "0")
    except Exception:
        pass  # the service stopped meanwhile: the other nodes report the job's status


def read_verdict(wait_s=5):
    """The status that the node which ended the job recorded, or None."""
    store = verdict_store()
    if store is None:
        return None
    key = VERDICT_KEY + setting("RUN_ID")
    deadline = time.monotonic() + wait_s
    try:
        while not store.check([key]):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        return int(store.get(key))
    except Exception:
        return None


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


def run():
    """The node from start to end, its output also in LOG_DIR; exits the process with its status."""
    tee = copy_output_to(setting("LOG_DIR"))
    try:
        status = main()
    except Refused as refused:
        error(refused)
        status = USAGE_ERROR
    marker = setting("NODE_MARKER")
    if marker and os.path.exists(marker):
        Path(marker).write_text(f"{status}\n")
    for signed in SIGNED:  # last: the service may end as soon as it reads this
        signed.sign_out(status)
    if tee:
        end_copy(tee)
    else:
        sys.stdout.flush()
        sys.stderr.flush()
    # Not sys.exit: the interpreter's teardown can destroy a C++ thread of torch's still running
    # (the store this node hosted, a rendezvous client) and abort the process with SIGABRT after
    # it has done its work (1 stopped host node in CI); there is nothing left to clean up.
    os._exit(status)
