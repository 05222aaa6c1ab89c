"""The generated project's own suite and `make train-local` pass on the host (no Docker)."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_generated_suite_passes(default_project):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=default_project,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout)
    assert " failed" not in result.stdout and " skipped" not in result.stdout


def test_train_local_trains_two_processes_with_decreasing_loss(default_project):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["make", "train-local", "ARGS=--epochs 3 --samples 1024"],
        cwd=default_project,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout
    losses = [float(x) for x in re.findall(r"epoch \d/3 loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 3 and losses[2] < losses[0], result.stdout
    assert re.search(r"final loss [0-9.]+ accuracy [0-9.]+", result.stdout)
    assert (default_project / "checkpoints" / "ckpt-epoch0003.pt").exists()
