"""DDP on several processes computes the same step as one process on the whole batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from nodes import free_port
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import default_collate

from {{ cookiecutter.package }} import distributed
from task import SmallCNN, synthetic

ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
BATCH = 16


def _batch():
    dataset = synthetic(BATCH, seed=1)
    return default_collate([dataset[i] for i in range(BATCH)])


def _one_step(model, images, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()


def _ddp_step(rank, out):
    # Different seeds per rank: DDP must broadcast rank 0's initial weights itself.
    torch.manual_seed(rank)
    model = SmallCNN()
    if rank == 0:
        torch.manual_seed(0)
        model = SmallCNN()
    net = DDP(model)
    images, labels = _batch()
    shard = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    _one_step(net, images[shard], labels[shard])
    torch.save(model.state_dict(), f"{out}.{rank}")
    return weakref.ref(net)


def _ddp_rank(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    net = None
    try:
        net = _ddp_step(rank, out)
    finally:
        distributed.shutdown()
        # DDP can outlive its function (a reference cycle): shutdown() collects it, and the group
        # ends with its threads, so none is left to abort the interpreter's exit.
        ddp_alive = net is not None and net() is not None
        Path(f"{out}.{rank}.shutdown").write_text(
            json.dumps([ddp_alive, dist.is_initialized(), _gloo_threads()])
        )


def _gloo_threads():
    """Names of this process's gloo worker threads (Linux; elsewhere none can be seen)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.exists() else []
    return [name for name in names if name.startswith("pt_gloo")]


def test_ddp_step_equals_single_process_on_full_batch(tmp_path):
    out = tmp_path / "params"
    mp.spawn(_ddp_rank, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD_SIZE)

    torch.manual_seed(0)
    reference = SmallCNN()
    _one_step(reference, *_batch())

    expected = reference.state_dict()
    for rank in range(WORLD_SIZE):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # shutdown() freed DDP, and with it the process group, before the processes exited.
    for rank in range(WORLD_SIZE):
        assert json.loads(Path(f"{out}.{rank}.shutdown").read_text()) == [False, False, []]
    # And the step changed something, so equality is not trivial.
    torch.manual_seed(0)
    untrained = SmallCNN().state_dict()
    assert not torch.equal(untrained["classifier.weight"], expected["classifier.weight"])


def _one_epoch(tmp_path, *launcher, batch_size):
    """One epoch of 37 samples by train_dist.py; the weights it saved."""
    folders = [f"--{name}-dir={tmp_path / name}" for name in ("data", "checkpoint", "log")]
    (tmp_path / "data").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    result = subprocess.run(
        [*launcher, "train_dist.py", "--epochs=1", "--samples=37", f"--batch-size={batch_size}"]
        + folders,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / "checkpoint" / "ckpt-epoch0001.pt", weights_only=True)["model"]


def test_a_short_last_step_counts_every_sample_once_as_one_process_would(tmp_path):
    # 37 samples in steps of 16: the last step has 5, 3 on rank 0 and 2 on rank 1. Each rank's
    # mean alone, averaged by DDP, would weigh rank 1's samples 3/2 as much as rank 0's.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = _one_epoch(tmp_path / "two", *torchrun, "--nproc-per-node=2", batch_size=8)
    one = _one_epoch(tmp_path / "one", sys.executable, batch_size=16)
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


JOINING = """
from {{ cookiecutter.package }} import distributed
with distributed.stop_at_once():  # as train_dist.py joins
    distributed.init("gloo", 60, 15)
"""


def test_a_rank_stopped_as_it_waits_for_its_round_under_torchrun_ends_at_once():
    """ended_by_a_stop_as_it_waits: rank 0 of 2 waits in init_process_group for a rank that never
    comes; torchrun's SIGTERM ends it at once, where it waited out its 60 s timeout before."""
    port = free_port()
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test")
    rank = subprocess.Popen([sys.executable, "-c", JOINING], cwd=ROOT, env=env)
    try:
        for _ in range(600):  # rank 0 hosts the store: listening, it waits for rank 1
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert rank.poll() is None, rank.returncode
                time.sleep(0.1)
        time.sleep(0.5)
        rank.send_signal(signal.SIGTERM)
        assert rank.wait(timeout=20) == -signal.SIGTERM
    finally:
        rank.kill()
