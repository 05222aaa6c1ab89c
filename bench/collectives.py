"""All-reduce timings: one JSON line per message size, printed by rank 0.

Usage (under torchrun): collectives.py [--sizes 4096,16384,...] [--seconds 2]
"""

import argparse
import json
import time

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--sizes", default=",".join(str(4096 * 4**i) for i in range(8)))
parser.add_argument("--seconds", type=float, default=2.0, help="time budget per size")
args = parser.parse_args()

dist.init_process_group("gloo")
for size in map(int, args.sizes.split(",")):
    tensor = torch.ones(size // 4, dtype=torch.float32)
    dist.all_reduce(tensor)  # warm-up: connections, buffers
    started = time.perf_counter()
    dist.all_reduce(tensor)
    estimate = time.perf_counter() - started
    # Every rank must run the same number of all-reduces: rank 0 decides.
    runs = torch.tensor([max(3, min(200, int(args.seconds / max(estimate, 1e-6))))])
    dist.broadcast(runs, src=0)
    timings = []
    for _ in range(int(runs)):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        timings.append(time.perf_counter() - started)
    timings.sort()
    if dist.get_rank() == 0:
        median = timings[len(timings) // 2]
        print(json.dumps({"bytes": size, "seconds": median, "runs": len(timings)}), flush=True)
dist.destroy_process_group()
