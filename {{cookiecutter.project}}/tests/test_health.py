"""What a node's healthcheck reports (docker/healthcheck.sh, docs/health.md): starting before
the first batch, training while local rank 0 takes batches, unhealthy once none came for
HEALTH_TIMEOUT seconds."""

import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from {{ cookiecutter.package }} import checkpoint
from {{ cookiecutter.package }}.health import beating, resting

CHECK = Path(__file__).resolve().parents[1] / "docker" / "healthcheck.sh"


def check(path, timeout="300"):
    env = {**os.environ, "HEALTH_FILE": str(path), "HEALTH_TIMEOUT": timeout}
    result = subprocess.run(["bash", CHECK], env=env, capture_output=True, text=True)
    return result.returncode, result.stdout.strip()


def test_no_batch_yet_is_healthy_a_recent_one_too_an_old_one_not(tmp_path):
    beat = tmp_path / "health"
    assert check(beat) == (0, "starting: no batch yet")
    beat.touch()
    code, said = check(beat)
    assert code == 0 and said.startswith("training: last batch")
    old = time.time() - 301
    os.utime(beat, (old, old))
    code, said = check(beat)
    assert code == 1 and said.startswith("no batch for 30") and "HEALTH_TIMEOUT=300" in said
    assert check(beat, timeout="600")[0] == 0


def test_without_a_timeout_the_check_fails_and_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HEALTH_TIMEOUT"}
    env["HEALTH_FILE"] = str(tmp_path / "health")
    result = subprocess.run(["bash", CHECK], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "HEALTH_TIMEOUT: is passed from .env" in result.stderr


@pytest.mark.parametrize("local_rank, touched", [("0", True), ("1", False)])
def test_local_rank_0_touches_the_file_as_batches_go_by(monkeypatch, tmp_path, local_rank, touched):
    beat = tmp_path / "health"
    monkeypatch.setenv("HEALTH_FILE", str(beat))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    batches = beating(iter(range(3)))
    assert next(batches) == 0
    assert beat.exists() is touched
    if touched:
        old = time.time() - 100
        os.utime(beat, (old, old))
        assert list(batches) == [1, 2]  # within a second of the first: not touched again
        assert beat.stat().st_mtime == pytest.approx(old)


def test_without_health_file_nothing_is_written(monkeypatch, tmp_path):
    monkeypatch.delenv("HEALTH_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert list(beating(iter(range(3)))) == [0, 1, 2]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("local_rank, kept", [("0", False), ("1", True)])
def test_local_rank_0_forgets_the_heartbeat_when_a_bounded_phase_starts(
    monkeypatch, tmp_path, local_rank, kept
):
    beat = tmp_path / "health"
    beat.touch()
    monkeypatch.setenv("HEALTH_FILE", str(beat))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    resting()
    assert beat.exists() is kept
    resting()  # and again, with no file


def test_a_node_saving_a_checkpoint_reads_as_starting_not_as_hung(monkeypatch, tmp_path):
    beat = tmp_path / "health"
    monkeypatch.setenv("HEALTH_FILE", str(beat))
    monkeypatch.setenv("LOCAL_RANK", "0")
    health_while_saving = []

    def save(*args, **kwargs):
        health_while_saving.append(check(beat, timeout="1"))
        return tmp_path / "saved.pt"

    monkeypatch.setattr(checkpoint, "save", save)
    monkeypatch.setattr(checkpoint, "write", save)
    batches = SimpleNamespace(position=lambda steps=None: {"epoch": 0, "samples": 0})
    resumed = SimpleNamespace(metrics=None, best=None)
    saver = checkpoint.Saver(
        tmp_path,
        keep=3,
        every=0,
        model=None,
        stepper=None,
        batches=batches,
        resumed=resumed,
        enabled=True,
    )
    monkeypatch.setattr(saver, "_state", lambda where: {})
    for save_one in (lambda: saver.epoch_done({}), lambda: saver.validated("val_loss", 1.0, min)):
        beat.touch()
        old = time.time() - 100
        os.utime(beat, (old, old))  # the last batch was long ago: a save of a large model
        save_one()
    assert health_while_saving == [(0, "starting: no batch yet")] * 2
