"""The training step: accumulation, precision, clipping, the schedule, seeds, and the stop vote
that never holds a rank up."""

import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from {{ cookiecutter.package }} import distributed
from {{ cookiecutter.package }}.dealing import default_workers, make_loader
from {{ cookiecutter.package }}.steps import Stepper, lr_factor

CPU = torch.device("cpu")


def test_the_schedule_warms_up_then_follows_a_cosine_to_zero():
    assert [lr_factor(p, "cosine", 0.2) for p in (0.0, 0.1, 0.2)] == [0.0, 0.5, 1.0]
    assert lr_factor(0.6, "cosine", 0.2) == pytest.approx(0.5)
    assert lr_factor(1.0, "cosine", 0.2) == pytest.approx(0.0)
    assert [lr_factor(p, "constant", 0.5) for p in (0.25, 0.5, 0.9)] == [0.5, 1.0, 1.0]
    assert lr_factor(0.3) == 1.0


class Task:
    @staticmethod
    def step(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x).squeeze(1), y), {}


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def _data():
    torch.manual_seed(1)
    return torch.randn(6, 3), torch.randn(6)


def test_two_weighed_batches_make_the_step_of_one_batch_of_both():
    x, y = _data()
    whole, parts = _model(), _model()
    one = Stepper(torch.optim.SGD(whole.parameters(), lr=0.1), CPU, total=6)
    one.backward(whole, Task, (x, y), 1.0, last=True)
    one.step(6)
    two = Stepper(torch.optim.SGD(parts.parameters(), lr=0.1), CPU, accum_steps=2, total=6)
    # 4 and 2 samples: each batch's mean weighed by its share of the 6.
    two.backward(parts, Task, (x[:4], y[:4]), 4 / 6, last=False)
    two.backward(parts, Task, (x[4:], y[4:]), 2 / 6, last=True)
    two.step(6)
    for a, b in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert two.ends_group(2, 9) and not two.ends_group(3, 9) and two.ends_group(9, 9)


def test_clipping_bounds_the_gradient_norm_and_the_schedule_sets_the_rate():
    x, y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    stepper = Stepper(optimizer, CPU, clip=1e-3, schedule="cosine", warmup=0.5, total=100)
    seen = []

    def record():
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        seen.append((norm, optimizer.param_groups[0]["lr"]))

    optimizer.step = record
    stepper.backward(model, Task, (x * 100, y), 1.0, last=True)
    stepper.step(25)
    norm, lr = seen[0]
    assert norm == pytest.approx(1e-3, rel=1e-4) and lr == pytest.approx(0.2)
    assert optimizer.param_groups[0]["initial_lr"] == 0.4


def test_fp16_scales_the_loss_and_its_scaler_state_is_kept():
    x, y = _data()
    model = _model()
    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1), CPU, precision="fp16")
    stepper.backward(model, Task, (x, y), 1.0, last=True)
    stepper.step(1)
    state = stepper.state_dict()
    # From 2**16, halved for each step whose scaled gradients overflowed fp16 (then skipped).
    assert state["scaler"]["scale"] == stepper.scaler.get_scale() in (2.0**16, 2.0**15)
    other = Stepper(torch.optim.SGD(_model().parameters(), lr=0.1), CPU, precision="fp16")
    other.load_state_dict({"scaler": {**state["scaler"], "scale": 1024.0}})
    assert other.scaler.get_scale() == 1024.0


class Noisy(Dataset):
    """A sample that draws from every generator, as augmentation does."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        import random

        import numpy

        return torch.tensor([index, torch.rand(1).item(), random.random(), numpy.random.rand()])


def test_a_batch_draws_the_same_numbers_whoever_loads_it():
    drawn = []
    for workers in (0, 2):
        loader, batches = make_loader(Noisy(), 4, rank=0, world_size=2, seed=5, workers=workers)
        batches.set_epoch(1)
        drawn.append(torch.cat([batch for batch, _ in loader]))
    torch.testing.assert_close(drawn[0], drawn[1])
    assert len(set(drawn[0][:, 1].tolist())) == len(drawn[0])  # and not one number repeated


@pytest.mark.parametrize("threads, workers", [("1", 0), ("3", 1), ("8", 4), ("32", 4)])
def test_loader_workers_follow_the_cpus_of_a_process(monkeypatch, threads, workers):
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    assert default_workers() == workers


def test_deterministic_turns_on_torchs_deterministic_algorithms():
    try:
        distributed.pick_device("gloo", 0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def _vote(rank, store, folder):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    distributed._control = dist.new_group(backend="gloo")
    stop = distributed.GracefulStop()
    returned = Path(folder) / "rank 0 returned"
    if rank == 1:
        stop.signal = 15  # asked to stop before its first vote
        deadline = time.monotonic() + 60
        # Rank 1 votes only once rank 0's first vote has returned: a vote that waited for the
        # other ranks would never return, and this wait would run out.
        while not returned.exists():
            assert time.monotonic() < deadline, "rank 0's vote waited for rank 1"
            time.sleep(0.01)
    first = stop.agreed()
    if rank == 0:
        returned.touch()
    second = stop.agreed()
    Path(folder, f"rank {rank}").write_text(f"{first} {second}")
    with stop:
        pass  # drains the vote still under way
    distributed.shutdown()


def test_the_stop_vote_holds_no_rank_up_and_every_rank_stops_at_the_same_call():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_vote, args=(os.path.join(folder, "store"), folder), nprocs=2)
        answers = [Path(folder, f"rank {rank}").read_text() for rank in (0, 1)]
    assert answers == ["False True", "False True"]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_steps_matmuls_run_in_the_chosen_precision(precision, dtype):
    x, y = _data()
    model, seen = _model(), []

    class Recording:
        @staticmethod
        def step(model, batch):
            out = model(batch[0])
            seen.append(out.dtype)
            return out.float().squeeze(1).sub(batch[1]).pow(2).mean(), {}

    stepper = Stepper(torch.optim.SGD(model.parameters(), lr=0.1), CPU, precision=precision)
    stepper.backward(model, Recording, (x, y), 1.0, last=True)
    assert seen == [dtype]


def test_at_batch_size_1_each_epoch_draws_anew_and_a_resume_draws_the_same():
    def draws(loader, batches, epoch, consumed=0):
        batches.set_epoch(epoch, consumed)
        return {int(ids): batch[0, 1].item() for batch, ids in loader}

    loader, batches = make_loader(Noisy(), 1, rank=0, world_size=1, seed=5)
    first, second = draws(loader, batches, 0), draws(loader, batches, 1)
    assert sorted(first) == sorted(second) == list(range(24))
    assert all(first[i] != second[i] for i in first)  # a new crop and flip every epoch
    again, batches = make_loader(Noisy(), 1, rank=0, world_size=1, seed=5, workers=2)
    resumed = draws(again, batches, 1, consumed=8)  # epoch 2, 8 samples in
    assert len(resumed) == 16 and resumed == {i: second[i] for i in resumed}
