"""What the ranks of a job do together: join, pick devices, agree, check, and leave."""

import gc
import hashlib
import json
import logging
import os
import signal
from contextlib import contextmanager
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

# Before any process group exists: imported after one (DDP's constructor does, through
# torch._dynamo), this package pins it in C++ for the rest of the process (torch 2.14).
import torch.distributed._shard  # noqa: F401

from {{ cookiecutter.package }}.errors import PEER_STOPPED, UsageError

log = logging.getLogger(__name__)
# Two CPU (gloo) groups beside the training group, each with its own bound. The control group
# carries what every rank reaches within a step of the others (stop votes, errors, metrics, the
# final check), so a silent peer fails it after --timeout, as it fails a training step. The
# waiting group carries the waits for slow work: the task's data, the checkpoint one rank reads
# and sends, the saves; a checkpoint of a few GB on a slow disk may take longer than --timeout,
# so its bound is --checkpoint-timeout.
_control = _waiting = None
_timeout = None


class Ranks(NamedTuple):
    """This process's place in the job."""

    rank: int
    world_size: int
    device: torch.device
    ddp: bool  # under torchrun, in a process group; False under a plain `python train_dist.py`


def join(args) -> Ranks:
    """Join the job's process groups (torchrun's environment), or none under plain `python`, and
    pick this process's device, as train_dist.py's flags say (--backend, --timeout,
    --checkpoint-timeout, --deterministic)."""
    if env_rank() == -1:
        return Ranks(0, 1, pick_device(args.backend, 0, args.deterministic), ddp=False)
    rank, world_size = init(args.backend, args.timeout, args.checkpoint_timeout)
    return Ranks(rank, world_size, pick_device(args.backend, rank, args.deterministic), ddp=True)


def init(backend, timeout_s, checkpoint_timeout_s):
    """Join the job's process groups (torchrun's environment); return (rank, world size)."""
    global _control, _waiting, _timeout
    _timeout = timedelta(seconds=timeout_s)
    with ended_by_a_stop_as_it_waits():
        dist.init_process_group(backend=backend, timeout=_timeout)
        _control = dist.new_group(backend="gloo", timeout=_timeout)
        _waiting = dist.new_group(backend="gloo", timeout=timedelta(seconds=checkpoint_timeout_s))
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def ended_by_a_stop_as_it_waits():
    """Joining the process groups waits in C++ for the round's other ranks, and no Python signal
    handler runs there: a rank that torchrun stopped as it waited (its round re-formed at once)
    waited on until torch killed it 30 s later (a `docker kill` took 33 s to training again in 1
    of 3 bench runs). Under torchrun a stop there ends the rank at once (the signal's default
    action: 143 for SIGTERM, as Stopped gives); nothing is trained yet to save."""
    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        yield  # a plain process or a test: Stopped, once the wait returns
        return
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in GracefulStop.SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def env_rank():
    """The rank torchrun gave this process (RANK), or -1 under a plain `python train_dist.py`."""
    return int(os.environ.get("RANK", -1))


def default_backend():
    """DDP_BACKEND if set; else nccl where this host has a GPU for each of its processes, and gloo
    where it has not (nccl refuses two processes on one GPU)."""
    if os.environ.get("DDP_BACKEND"):
        return os.environ["DDP_BACKEND"]
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus >= processes else "gloo"


def pick_device(backend, rank, deterministic=False):
    """CPU for gloo; for nccl, GPU `rank mod GPUs`. `deterministic`: torch's deterministic
    algorithms (an error for an operation that has none), cuDNN's benchmark off.

    Not LOCAL_RANK: on one host every Compose node sees all GPUs and runs local rank 0, so
    LOCAL_RANK would put every node on GPU 0. With one node per host and NPROC_PER_NODE equal
    to its GPUs, rank mod GPUs is LOCAL_RANK.
    """
    if deterministic:
        # cuBLAS needs this workspace setting for reproducible results; read at CUDA's start.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    # Fixed input shapes: let cuDNN pick its fastest kernels once (not the same from run to run).
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    return device


def broadcast_bytes(data, src):
    """`src`'s bytes on every rank, under --checkpoint-timeout (the others wait for it to read
    them). Bytes, not objects: what a peer sends is never unpickled here (docs/security.md)."""
    if not dist.is_initialized():
        return data
    size = torch.tensor([len(data) if dist.get_rank() == src else 0], dtype=torch.int64)
    dist.broadcast(size, src=src, group=_waiting)
    if dist.get_rank() == src:
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
    else:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    if int(size.item()):
        dist.broadcast(payload, src=src, group=_waiting)
        return data if dist.get_rank() == src else payload.numpy().tobytes()
    return b""


def gather_ints(values):
    """Every rank's list of integers (all of one length), in rank order, on every rank, under
    --checkpoint-timeout."""
    mine = torch.tensor(values, dtype=torch.int64)
    if not dist.is_initialized():
        return [mine.tolist()]
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine, group=_waiting)
    return [row.tolist() for row in everyone]


def gather(obj):
    """Every rank's `obj` (numbers, strings, lists and dicts: JSON), in rank order, on every rank.
    JSON, not pickle: a peer's message is data, never code (docs/security.md)."""
    if not dist.is_initialized():
        return [obj]
    mine = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mine.numel()]), group=_control)
    longest = max(int(size.item()) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: mine.numel()] = mine
    everyone = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(everyone, padded, group=_control)
    return [
        json.loads(row[: int(size.item())].numpy().tobytes())
        for row, size in zip(everyone, sizes, strict=True)
    ]


def wait_for_all():
    """Until every rank is here (under --checkpoint-timeout): after reads or writes, so that the
    next collective, bounded by --timeout, does not count the time some rank spent on them."""
    if dist.is_initialized():
        dist.barrier(group=_waiting)


@contextmanager
def fail_together(slow=False, once=False):
    """A UsageError (missing data, an unwritable folder, a mistake in the task) on one rank
    stops every rank with it.

    The others would otherwise wait in their next collective until it times out, and torchrun
    would restart a job that cannot succeed. Only the ranks that found the problem report it;
    `once`: only the lowest of them (a mistake in the task, which every rank finds alike; a
    folder missing on a machine is said by each machine that lacks it). Ranks wait for each
    other's block under --checkpoint-timeout (data to load, a checkpoint to read or write); a
    rank whose block is `slow` (one writing a checkpoint) waits for the others only under
    --timeout, since they were waiting already: a peer that hung meanwhile ends the job as soon
    as in a training step.
    """
    timeout = _timeout if dist.is_initialized() and slow else None
    try:
        yield
    except UsageError as err:
        if not dist.is_initialized():
            raise
        # Votes: 0 no error, 1 an error without a message, and above that one per rank with a
        # message, the highest for the lowest rank.
        mine = 2 + dist.get_world_size() - dist.get_rank() if str(err) else 1
        if _max_vote(mine, timeout) != mine and once:
            raise UsageError("") from None
        raise
    if _max_vote(0, timeout):
        raise UsageError("")


def _max_vote(value, timeout):
    """The largest of every rank's `value`, on the waiting group (at most `timeout`)."""
    if not dist.is_initialized():
        return value
    votes = torch.tensor([value])
    vote = dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=_waiting, async_op=True)
    if timeout:
        vote.wait(timeout)
    else:
        vote.wait()
    return int(votes.item())


class Stopped(BaseException):
    """A SIGTERM/SIGINT outside the training loop: the rank ends at once with the signal's
    status. A BaseException, so that no `except Exception` on its way (ours, torch's, the
    task's) takes the stop for an error and goes on: CI saw a stop sent as a rank resumed
    swallowed, and the rank trained on with its round to the end while its node left."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.status = 128 + signum


@contextmanager
def stop_at_once():
    """Inside it, outside `with stop:` (joining, loading, resuming, the end), a SIGTERM/SIGINT
    raises Stopped in this process. A process forked from it (a DataLoader worker) gets the
    default action: the rank it serves decides."""
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handle) for sig in GracefulStop.SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class GracefulStop:
    """Inside `with stop:` (the training loop) a SIGTERM/SIGINT is remembered, so that training
    stops between two steps; outside it they end the process at once (stop_at_once), so a
    process that is still joining the job, or loading data, exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self.stopped = False  # agreed: every rank stops at the same step
        self._previous = {}
        self._vote = self._votes = None

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, error, *exc):
        # A vote still under way must end before its group does; after an error (a peer gone
        # silent, say) it may never end, and the process is on its way out anyway.
        if self._vote is not None and error is None:
            self._vote.wait()
        self._vote = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self):
        """True on every rank, at the same call, once any rank was asked to stop.

        Each call reads the vote the call before started and starts the next one: an
        asynchronous all-reduce of a CPU tensor on the control group, which has had a whole
        step to arrive. A vote read in the same step (an all-reduce and .item() of a GPU tensor)
        would make the host wait for the GPU at every step, and the GPU then idle while the
        host prepares the next one. The cost is one step: a stop lands a step later.
        """
        if not dist.is_initialized():
            self.stopped = self.signal is not None
            return self.stopped
        if self._vote is not None:
            self._vote.wait()
            self.stopped = bool(self._votes.item())
        self._votes = torch.tensor([int(self.signal is not None)])
        self._vote = dist.all_reduce(
            self._votes, op=dist.ReduceOp.MAX, group=_control, async_op=True
        )
        return self.stopped

    def exit_status(self):
        """The signal's status on the rank that got it; PEER_STOPPED on the others, so that
        torchrun restarts them into a job without the stopped node."""
        return 128 + self.signal if self.signal else PEER_STOPPED


def sync_buffers(model):
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, as DDP gives them at the
    start of each training step. For validation and the final check: after a step each rank
    holds the statistics of its own batch, and weights of BatchNorm models would differ."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def fingerprint(model):
    """A short hash of the weights: equal on every rank if DDP kept them in step."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def check_in_step(model):
    """Log each rank's host and weight fingerprint; fail if the weights differ."""
    everyone = gather((os.uname().nodename, fingerprint(model)))
    log.info("weights by rank: %s", " ".join(f"{r}@{h}={f}" for r, (h, f) in enumerate(everyone)))
    if len({f for _, f in everyone}) != 1:
        raise RuntimeError("ranks ended with different weights")


def shutdown():
    """Destroy the process group, and so end gloo's threads, while Python is fully alive.

    A gloo thread still alive at interpreter exit can be releasing the tensors of the last
    collective, which needs the GIL: Python ends such a thread, and the process aborts
    ("terminate called without an active exception") after a job that finished. The group dies
    with its last reference: DDP can hold one in a reference cycle, hence the collection.
    """
    global _control, _waiting
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = _waiting = None
