"""The reference for the generic loop's overhead (make bench, "loop"): a minimal hand-written DDP
loop on the same model, data and batch as train_dist.py's default task, with none of its
guarantees (no stop vote, no sample ids, no checkpoints, no validation). Copied into the bench
project and run there under torchrun: python -m torch.distributed.run ... minimal_ddp.py."""

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from task import SmallCNN, synthetic
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--samples", type=int, default=4096)
parser.add_argument("--batch-size", type=int, default=64)
args, _ = parser.parse_known_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
model = DDP(SmallCNN())
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
dataset = synthetic(args.samples)
sampler = DistributedSampler(dataset, seed=0)
loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
for epoch in range(args.epochs):
    sampler.set_epoch(epoch)
    started, seen = time.perf_counter(), 0
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    seen *= dist.get_world_size()
    if dist.get_rank() == 0:
        print(f"epoch {epoch + 1} samples/s {seen / (time.perf_counter() - started):.0f}")
dist.destroy_process_group()
