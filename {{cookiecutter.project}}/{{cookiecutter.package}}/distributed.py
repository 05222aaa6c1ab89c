"""What the ranks of a job do together: agree on an outcome, and leave the process group."""

import gc
from contextlib import contextmanager

import torch
import torch.distributed as dist

# Before any process group exists: imported after one (DDP's constructor does, through
# torch._dynamo), this package pins it in C++ for the rest of the process (torch 2.14).
import torch.distributed._shard  # noqa: F401

from {{ cookiecutter.package }}.data import DataError


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
