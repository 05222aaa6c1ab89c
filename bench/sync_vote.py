"""The stop vote before issue 21, for `make bench` ("stop vote"): train_dist.py with
GracefulStop.agreed as it was, an all-reduce on the default group read (.item()) in the same
step, every step. Copied into the bench project and run there under torchrun."""

import sys

import torch
import torch.distributed as dist
import train_dist
from ddp_bench import distributed


def agreed(self):
    if not dist.is_initialized():
        self.stopped = self.signal is not None
        return self.stopped
    votes = torch.tensor([int(self.signal is not None)])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    self.stopped = bool(votes.item())
    return self.stopped


distributed.GracefulStop.agreed = agreed
sys.exit(train_dist.main())
