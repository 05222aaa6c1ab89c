"""Start-up probe: join the process group, then rank 0 prints the wall-clock time."""

import time

import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 0:
    print(f"joined {time.time():.3f} world {dist.get_world_size()}", flush=True)
dist.destroy_process_group()
