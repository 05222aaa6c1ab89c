"""Each of train_dist.py's loop flags, tested by what it does through train_dist.py itself:
--accum-steps, --compile and --deterministic."""

import shutil

import pytest
import torch

import train_dist
from {{ cookiecutter.package }} import task_loader
from {{ cookiecutter.package }}.distributed import Ranks
from {{ cookiecutter.package }}.flags import ROOT, parse_args


def _weights(tmp_path, name, *flags):
    (tmp_path / "data").mkdir(exist_ok=True)
    ckpt = tmp_path / name
    argv = [
        "--epochs=1",
        "--samples=96",
        "--workers=0",
        "--lr=0.1",
        f"--data-dir={tmp_path / 'data'}",
        f"--checkpoint-dir={ckpt}",
        f"--log-dir={tmp_path / name / 'logs'}",
        *flags,
    ]
    assert train_dist.main(argv) == 0
    return torch.load(ckpt / "ckpt-epoch0001.pt", weights_only=True)["model"]


def test_two_accumulated_batches_of_16_train_as_one_batch_of_32(tmp_path):
    whole = _weights(tmp_path, "whole", "--batch-size=32")
    parts = _weights(tmp_path, "parts", "--batch-size=16", "--accum-steps=2")
    unaccumulated = _weights(tmp_path, "steps", "--batch-size=16")
    for name, tensor in whole.items():
        torch.testing.assert_close(parts[name], tensor, rtol=0, atol=1e-6)
    # And the comparison can tell: 16 a step trains other weights.
    assert any((unaccumulated[n] - t).abs().max() > 1e-4 for n, t in whole.items())


def test_compile_hands_the_loop_the_compiled_module(tmp_path, monkeypatch):
    # What torch.compile returns is what the loop trains (compiling itself needs a C++ compiler,
    # which the image lacks: test_cli's test_compile_trains_or_says_what_it_lacks).
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(torch, "compile", lambda module: ("compiled", module))
    task = task_loader.load("task.py", ROOT)
    ranks = Ranks(0, 1, torch.device("cpu"), ddp=False)
    nets = []
    for flags in (["--compile"], []):
        args = parse_args([*flags, "--samples=8", f"--checkpoint-dir={tmp_path}"], task)
        nets.append(train_dist.load_model(args, task, ranks, train_size=8)[:2])
    (model, compiled), (plain, trained) = nets
    assert compiled == ("compiled", model) and trained is plain


@pytest.mark.parametrize("flag, enabled", [("--deterministic", True), (None, False)])
def test_deterministic_reaches_torch_from_the_command_line(tmp_path, flag, enabled):
    try:
        _weights(tmp_path, "d", *([flag] if flag else []))
        assert torch.are_deterministic_algorithms_enabled() is enabled
    finally:
        torch.use_deterministic_algorithms(False)
