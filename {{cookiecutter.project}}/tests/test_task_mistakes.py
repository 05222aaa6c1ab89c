"""A fork's mistakes in its task: each stops with status 2 before the first optimizer step, in
one message that says what to fix, with the task's own traceback lines (task_check.py)."""

import signal
import sys

import pytest
import torch

import train_dist

# A regression task written from task.py's docstring, with a switch for each mistake people
# make (2026-12-02).
TASK = """
import os
import signal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

BUG = @BUG@
MONITOR, MODE = @MONITOR@, "min"


def add_arguments(parser):
    parser.add_argument("--hidden", type=int, default=8)
    parser.set_defaults(lr=0.01)


class Stream(IterableDataset):
    def __iter__(self):
        return iter([])


def datasets(args):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=generator)
    y = x.sum(1, keepdim=True)
    if BUG == "float64 data":
        x, y = x.double(), y.double()
    if BUG == "iterable dataset":
        return Stream(), None
    if BUG == "a stop, caught":
        try:  # a broad except in a task's loading code, or in a library's
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:
            pass
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def model(args):
    return nn.Sequential(nn.Linear(4, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 1))


def optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr)


def step(model, batch):
    x, y = batch
    out = model(x)
    loss = F.mse_loss(out, y)
    if BUG == "loss of shape [B]":
        loss = F.mse_loss(out, y, reduction="none").mean(1)
    if BUG == "loss as a float":
        loss = loss.item()
    if BUG == "raises":
        raise KeyError("label")
    return loss, dict(squared=F.mse_loss(out, y, reduction="sum"))


def summarize(sums):
    mse = sums["squared"] / sums["samples"]
    return dict(loss=sums["loss"] / sums["samples"], rmse=mse**0.5)
"""


@pytest.fixture(autouse=True)
def _own_task_module():
    # A task file outside the project is imported as the module "task": the project's own
    # task.py is "task" again after each test.
    before = sys.modules.pop("task", None)
    yield
    sys.modules.pop("task", None)
    if before is not None:
        sys.modules["task"] = before


def _task(tmp_path, bug="", monitor="rmse"):
    path = tmp_path / f"regression_{abs(hash((bug, monitor)))}.py"
    path.write_text(TASK.replace("@BUG@", repr(bug)).replace("@MONITOR@", repr(monitor)))
    return path


def _main(tmp_path, task, *extra):
    (tmp_path / "data").mkdir(exist_ok=True)
    folders = [
        f"--data-dir={tmp_path / 'data'}",
        f"--checkpoint-dir={tmp_path / 'ckpt'}",
        f"--log-dir={tmp_path / 'logs'}",
    ]
    argv = [f"--task={task}", "--batch-size=16", "--workers=0", *folders, *extra]
    return train_dist.main(argv)


@pytest.mark.parametrize(
    "bug, fix, traceback",
    [
        ("loss as a float", "return the tensor itself (no .item()", "in the task: step()"),
        ("loss of shape [B]", "a loss of shape [16]: return the batch's mean", "step()"),
        ("float64 data", "make datasets() return float32 tensors", "in step\n"),
        ("iterable dataset", "needs a map-style dataset", None),
        ("raises", "raised KeyError: 'label': fix the task's", 'raise KeyError("label")'),
    ],
)
def test_a_mistake_in_the_task_stops_before_training_with_what_to_fix(
    tmp_path, capsys, bug, fix, traceback
):
    assert _main(tmp_path, _task(tmp_path, bug), "--epochs=1") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("ERROR: ") and fix in err, err
    if traceback:
        assert traceback in err, err
        assert "train_dist.py" not in err  # the task's lines, not the machinery's
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("ckpt-*"))
    assert fix in (tmp_path / "logs" / "train.log").read_text()


@pytest.mark.parametrize("monitor", ["rmse", "val_rmse"])
def test_monitor_is_taken_with_or_without_its_val_prefix(tmp_path, monitor):
    assert _main(tmp_path, _task(tmp_path, monitor=monitor), "--epochs=1") == 0
    best = torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)
    assert best["best"] == pytest.approx(best["metrics"]["val_rmse"])


@pytest.mark.parametrize(
    "monitor, listed", [("rsme", "['loss', 'rmse']"), ("val_rsme", "['val_loss', 'val_rmse']")]
)
def test_an_unknown_monitor_is_found_on_the_first_batch_and_listed_as_written(
    tmp_path, capsys, monitor, listed
):
    assert _main(tmp_path, _task(tmp_path, monitor=monitor), "--epochs=1") == 2
    err = capsys.readouterr().err
    assert f"MONITOR {monitor!r} is not one of {listed}" in err
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())


def test_a_checkpoint_of_another_model_stops_and_changes_no_file(tmp_path, capsys):
    task = _task(tmp_path)
    assert _main(tmp_path, task, "--epochs=1") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    assert _main(tmp_path, task, "--epochs=2", "--hidden=16") == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert "ckpt-epoch0001.pt" in line and "size mismatch" in line
    assert "start afresh (make fresh-start), or point --checkpoint-dir elsewhere" in line.lower()
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


def test_help_shows_every_default_the_tasks_included(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_dist.main([f"--task={_task(tmp_path)}", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "learning rate (a task may set its own) (default: 0.01)" in out  # set_defaults
    assert "--hidden HIDDEN (default: 8)" in out  # a task's flag without help
    assert "--seed SEED what orders the epochs and seeds the data (default: 0)" in out


def test_a_stop_while_the_tasks_code_runs_is_a_stop_that_no_except_can_swallow(tmp_path, capsys):
    """A SIGTERM before the training loop (docker stop, make scale, torch's agent ending a
    round) ends the rank at once with 143, even inside `except Exception` (CI saw a stop sent
    while a rank resumed swallowed: it trained on with its round while its node left)."""
    before = signal.getsignal(signal.SIGTERM)
    assert _main(tmp_path, _task(tmp_path, "a stop, caught")) == 128 + signal.SIGTERM
    assert "ERROR" not in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
    assert signal.getsignal(signal.SIGTERM) is before  # main's handler ends with main
