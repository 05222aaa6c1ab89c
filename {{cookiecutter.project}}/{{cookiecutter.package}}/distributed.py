"""What the ranks of a job do together: join, pick devices, agree, check, and leave."""

import gc
import hashlib
import logging
import os
import signal
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

# Before any process group exists: imported after one (DDP's constructor does, through
# torch._dynamo), this package pins it in C++ for the rest of the process (torch 2.14).
import torch.distributed._shard  # noqa: F401

from {{ cookiecutter.package }}.data import DataError

log = logging.getLogger(__name__)
# The status of the ranks that stopped because another rank was asked to (docker/launch.py knows
# it too): torchrun re-forms the job without the node that left, and counts no failure.
PEER_STOPPED = 75


def init(backend, timeout_s):
    """Join the job's process group (torchrun's environment); return (rank, world size)."""
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def default_backend():
    """DDP_BACKEND if set; else nccl where this host has a GPU for each of its processes, and gloo
    where it has not (nccl refuses two processes on one GPU)."""
    if os.environ.get("DDP_BACKEND"):
        return os.environ["DDP_BACKEND"]
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus >= processes else "gloo"


def pick_device(backend, rank):
    """CPU for gloo; for nccl, GPU `rank mod GPUs`.

    Not LOCAL_RANK: on one host every Compose node sees all GPUs and runs local rank 0, so
    LOCAL_RANK would put every node on GPU 0. With one node per host and NPROC_PER_NODE equal
    to its GPUs, rank mod GPUs is LOCAL_RANK.
    """
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    # Fixed input shapes: let cuDNN pick its fastest kernels once.
    torch.backends.cudnn.benchmark = True
    return device


def from_rank_0(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag, device):
    """True on every rank as soon as `flag` is true on one of them."""
    if not dist.is_initialized():
        return bool(flag)
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


@contextmanager
def fail_together(device):
    """A DataError (missing data, an unwritable folder) on one rank stops every rank with it.

    The others would otherwise wait in their next collective until it times out, and torchrun
    would restart a job that cannot succeed. Only the rank that found the problem reports it.
    """
    try:
        yield
    except DataError:
        any_rank(True, device)
        raise
    if any_rank(False, device):
        raise DataError("")


class GracefulStop:
    """Inside `with stop:` (the training loop) a SIGTERM/SIGINT is remembered, so that training
    stops between two steps; outside it they act as usual, so a process that is still joining
    the job, or loading data, exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, device):
        """True on every rank as soon as any rank was asked to stop."""
        return any_rank(self.signal is not None, device)

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
    mine = (os.uname().nodename, fingerprint(model))
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
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
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
