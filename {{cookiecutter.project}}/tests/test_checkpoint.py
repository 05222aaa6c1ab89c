import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from {{ cookiecutter.package }} import checkpoint


def _state(epoch):
    return {"weights": torch.full((3,), float(epoch)), "epoch": epoch, "loss": 1.0 / epoch}


def test_round_trip(tmp_path):
    path = checkpoint.save(_state(1), tmp_path, 1)
    state, loaded_from = checkpoint.load_latest(tmp_path)
    assert loaded_from == path
    assert state["epoch"] == 1
    assert torch.equal(state["weights"], torch.ones(3))


def test_newest_wins_and_only_the_last_k_are_kept(tmp_path):
    for epoch in range(1, 6):
        checkpoint.save(_state(epoch), tmp_path, epoch, keep=2)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt-epoch0004.pt", "ckpt-epoch0005.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path):
    checkpoint.save(_state(1), tmp_path, 1)
    bad = checkpoint.save(_state(2), tmp_path, 2)
    bad.write_bytes(bad.read_bytes()[:20])
    state, path = checkpoint.load_latest(tmp_path)
    assert state["epoch"] == 1 and path.name == "ckpt-epoch0001.pt"
    assert (tmp_path / "ckpt-epoch0002.pt.corrupt").exists()


class Unlisted:
    """A class that torch.load(weights_only=True) does not allow: what a fork adds to a state."""


def test_a_state_the_safe_loader_refuses_stops_the_job_and_is_left_in_place(tmp_path):
    checkpoint.save(_state(1), tmp_path, 1)
    refused = checkpoint.save({**_state(2), "extra": Unlisted()}, tmp_path, 2)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_latest(tmp_path)
    message = str(error.value)
    assert str(refused) in message and "Unlisted" in message
    assert "add_safe_globals" in message and "\n" not in message
    # Never a silent step back: no file set aside, none older loaded.
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == [
        "ckpt-epoch0001.pt",
        "ckpt-epoch0002.pt",
    ]
    assert not list(tmp_path.glob("*.corrupt"))


def test_garbage_under_a_checkpoint_name_is_set_aside(tmp_path):
    checkpoint.save(_state(1), tmp_path, 1)
    (tmp_path / "ckpt-epoch0002.pt").write_bytes(b"garbage" * 10)
    state, path = checkpoint.load_latest(tmp_path)
    assert state["epoch"] == 1 and (tmp_path / "ckpt-epoch0002.pt.corrupt").exists()


def test_a_read_error_stops_the_job_and_sets_nothing_aside(tmp_path, monkeypatch):
    checkpoint.save(_state(1), tmp_path, 1)
    newest = checkpoint.save(_state(2), tmp_path, 2)

    def read_error(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.torch, "load", read_error)
    with pytest.raises(checkpoint.CheckpointError, match="Input/output error") as error:
        checkpoint.load_latest(tmp_path)
    assert str(newest) in str(error.value) and newest.exists()
    assert not list(tmp_path.glob("*.corrupt"))


def test_best_is_neither_pruned_nor_resumed_from(tmp_path):
    checkpoint.write(_state(1), tmp_path / checkpoint.BEST)
    for epoch in range(2, 6):
        checkpoint.save(_state(epoch), tmp_path, epoch, keep=1)
    assert (tmp_path / "best.pt").exists()
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-epoch0005.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 5


def test_half_written_temporary_file_is_ignored(tmp_path):
    checkpoint.save(_state(1), tmp_path, 1)
    (tmp_path / f".ckpt-epoch0002.pt.{os.uname().nodename}-1.tmp").write_bytes(b"partial")
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 1


def test_no_checkpoint(tmp_path):
    assert checkpoint.load_latest(tmp_path / "missing") == (None, None)


def test_mid_epoch_checkpoints_sort_between_epochs(tmp_path):
    checkpoint.save(_state(2), tmp_path, 2)
    checkpoint.save(_state(3), tmp_path, 2, samples=2560)
    checkpoint.save(_state(1), tmp_path, 1)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt-epoch0001.pt", "ckpt-epoch0002.pt", "ckpt-epoch0002-sample00002560.pt"]
    assert checkpoint.load_latest(tmp_path)[1].name == "ckpt-epoch0002-sample00002560.pt"


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(_state(1), tmp_path, 1)

    def disk_full(state, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(checkpoint.WriteError, match="ckpt-epoch0002.pt: No space left on device"):
        checkpoint.save(_state(2), tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-epoch0001.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 1


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_a_failed_fsync_or_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch, call):
    checkpoint.save(_state(1), tmp_path, 1)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, call, disk_full)
    with pytest.raises(checkpoint.WriteError) as failed:
        checkpoint.save(_state(2), tmp_path, 2)
    monkeypatch.undo()
    assert "No space left on device" in str(failed.value)
    assert "the previous checkpoints are kept" in str(failed.value)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-epoch0001.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 1


# A real failed write, not a faked one: a file size limit makes the kernel refuse the bytes past
# it (EFBIG), as a full disk does (ENOSPC). torch's writer reports it as a RuntimeError.
LIMITED = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from {{ cookiecutter.package }} import checkpoint
checkpoint.save(dict(epoch=1, w=torch.zeros(4)), sys.argv[2], 1)
resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, resource.RLIM_INFINITY))
try:
    checkpoint.save(dict(epoch=2, w=torch.zeros(2**20)), sys.argv[2], 2)
except checkpoint.WriteError as err:
    print(err)
"""


def test_a_write_the_kernel_refuses_is_one_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path,
):
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, root, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    said = result.stdout.strip()
    assert said.startswith(f"cannot write checkpoint {tmp_path}/ckpt-epoch0002.pt: "), said
    assert "MiB free there); the previous checkpoints are kept" in said
    assert len(said.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-epoch0001.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 1


# Saves a small checkpoint, then a 256 MB one that the test kills halfway.
WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from {{ cookiecutter.package }} import checkpoint
checkpoint.save(dict(epoch=1, w=torch.zeros(4)), sys.argv[2], 1)
print("first", flush=True)
checkpoint.save(dict(epoch=2, w=torch.zeros(64 * 2**20)), sys.argv[2], 2)
"""


def test_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    root = str(Path(__file__).resolve().parents[1])
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, root, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "first"
    deadline = time.monotonic() + 60
    while not any(tmp.stat().st_size > 0 for tmp in tmp_path.glob(".ckpt-epoch0002.pt.*.tmp")):
        assert time.monotonic() < deadline and writer.poll() is None, "never saw the write start"
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not (tmp_path / "ckpt-epoch0002.pt").exists()
    state, path = checkpoint.load_latest(tmp_path)
    assert state["epoch"] == 1 and path.name == "ckpt-epoch0001.pt"


def _model_and_optimizer(seed):
    from task import SmallCNN

    torch.manual_seed(seed)
    model = SmallCNN()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_a_restored_state_goes_on_where_it_was_saved(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    metrics = {"loss": 1.5, "accuracy": 0.25, "samples_per_s": 10.0, "world_size": 2}
    where = {"epoch": 2, "samples": 448, "world_size": 2, "batch_size": 32, "seed": 7}
    state_now = checkpoint.state(model, optimizer, where, metrics, best=0.5)
    path = checkpoint.save(state_now, tmp_path, 2, 448)
    state, _ = checkpoint.load_latest(tmp_path)

    other, other_optimizer = _model_and_optimizer(1)
    restored = checkpoint.restore(state, other, other_optimizer, samples_per_step=99)
    assert restored == (2, 448, 7, metrics, 0.5, None)  # no size: `where` left it out
    assert path.name == "ckpt-epoch0002-sample00000448.pt"
    for name, tensor in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor), name
    assert checkpoint.restore(None, other, other_optimizer, 99) == checkpoint.Resumed()


def test_an_older_checkpoint_counted_steps_of_the_current_world_size(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    older = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}
    older.update(step=40, loss=None, accuracy=None)
    torch.save(older, tmp_path / "ckpt-epoch0001-step000040.pt")
    state, path = checkpoint.load_latest(tmp_path)
    assert path.name == "ckpt-epoch0001-step000040.pt"
    resumed = checkpoint.restore(state, model, optimizer, samples_per_step=64)
    assert resumed == checkpoint.Resumed(epoch=1, samples=2560)
    older.update(epoch=2, step=0, loss=1.5, accuracy=0.25)
    restored = checkpoint.restore(older, model, optimizer, samples_per_step=64)
    assert restored.metrics == {"loss": 1.5, "accuracy": 0.25}


class _Batches:
    """EpochBatches' position for a saver: 256 samples an epoch, 32 a step."""

    size, epoch = 256, 1

    def position(self, steps=None):
        if steps is None:
            return {"epoch": self.epoch + 1, "samples": 0}
        return {"epoch": self.epoch, "samples": min(self.size, steps * 32)}

    def ids(self, first, last):
        return list(range(first * 32, last * 32))


def _saver(tmp_path, enabled=True, every=3, keep=3):
    model, optimizer = _model_and_optimizer(0)
    return checkpoint.Saver(
        tmp_path,
        keep=keep,
        every=every,
        model=model,
        stepper=SimpleNamespace(optimizer=optimizer, state_dict=dict, stepping=False),
        batches=_Batches(),
        resumed=checkpoint.Resumed(),
        enabled=enabled,
    )


def test_the_saver_writes_every_n_steps_at_a_stop_and_at_the_epoch_end(tmp_path):
    saver = _saver(tmp_path, every=3)
    for steps in range(1, 8):
        saver.midway(steps)
    saver.stopped(7)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == [
        "ckpt-epoch0001-sample00000096.pt",  # step 3
        "ckpt-epoch0001-sample00000192.pt",  # step 6
        "ckpt-epoch0001-sample00000224.pt",  # the stop, after step 7
    ]
    saver.epoch_done({"loss": 0.5})
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 2
    assert [p.name for p in checkpoint.checkpoints(tmp_path)][-1] == "ckpt-epoch0002.pt"


def test_keep_prunes_mid_epoch_checkpoints_oldest_first_and_never_best(tmp_path):
    saver = _saver(tmp_path, every=1, keep=2)
    saver.validated("val_loss", 1.0, lambda new, old: new < old)
    for steps in range(1, 5):
        saver.midway(steps)
    saver.epoch_done({"loss": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt",
        "ckpt-epoch0001-sample00000128.pt",
        "ckpt-epoch0002.pt",
    ]
    saver.validated("val_loss", 2.0, lambda new, old: new < old)  # worse: best.pt stays
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best"] == 1.0


def test_a_rank_that_does_not_write_its_folder_writes_nothing(tmp_path):
    # Another rank writes that folder (resuming.find_folders): rank 0 where all share one.
    saver = _saver(tmp_path, enabled=False, every=1)
    saver.midway(1)
    saver.stopped(2)
    saver.validated("val_loss", 1.0, lambda new, old: new < old)
    saver.epoch_done({"loss": 0.5})
    assert list(tmp_path.iterdir()) == []
    assert saver.best_value == 1.0  # every rank knows the best value: they agree on the next


def test_a_whole_checkpoint_that_fails_to_load_stops_and_is_not_set_aside(tmp_path, monkeypatch):
    checkpoint.save(_state(1), tmp_path, 1)
    newest = checkpoint.save(_state(2), tmp_path, 2)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate")

    monkeypatch.setattr(checkpoint.torch, "load", out_of_memory)
    with pytest.raises(checkpoint.CheckpointError, match="can't allocate") as error:
        checkpoint.load_latest(tmp_path)
    assert str(newest) in str(error.value) and "MEMORY" in str(error.value)
    assert len(checkpoint.checkpoints(tmp_path)) == 2 and not list(tmp_path.glob("*.corrupt"))


def _better(new, old):
    return new > old  # MODE "max"


def test_a_worse_later_epoch_keeps_best_pt_and_each_checkpoint_records_the_best(tmp_path):
    saver = _saver(tmp_path, every=0)
    saver.batches.epoch = 0
    saver.epoch_done({"loss": 0.9}, "val_accuracy", 0.30, _better)
    first = torch.load(tmp_path / "best.pt", weights_only=True)
    saver.batches.epoch = 1
    saver.epoch_done({"loss": 0.8}, "val_accuracy", 0.25, _better)  # worse, no tie
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["best"] == 0.30 and best["metrics"] == {"loss": 0.9}
    assert torch.equal(best["model"]["classifier.bias"], first["model"]["classifier.bias"])
    # The epoch's checkpoint counts its own validation: a resume from it knows the best.
    for name in ("ckpt-epoch0001.pt", "ckpt-epoch0002.pt"):
        assert torch.load(tmp_path / name, weights_only=True)["best"] == 0.30


def test_a_resume_keeps_a_better_best_pt_than_its_checkpoint_records(tmp_path):
    from {{ cookiecutter.package }} import resuming

    model, optimizer = _model_and_optimizer(0)
    where = {"epoch": 3, "samples": 0, "seed": 0, "size": 256}
    # Stopped between the two saves: best.pt (0.1875) is newer than the checkpoint's best.
    best = checkpoint.state(model, optimizer, where, {}, best=0.1875)
    checkpoint.write(best, tmp_path / "best.pt")
    checkpoint.save(checkpoint.state(model, optimizer, where, {}, best=0.125), tmp_path, 3)
    stepper = SimpleNamespace(optimizer=optimizer, load_state_dict=lambda state: None)
    common = dict(rank=0, keep=3, seed=0, size=256, samples_per_step=32, better=_better)
    resumed, _ = resuming.resume(tmp_path, model, stepper, **common)
    assert resumed.epoch == 3 and resumed.best == 0.1875
    saver = _saver(tmp_path, every=0)
    saver.best_value = resumed.best
    saver.batches.epoch = 3
    saver.epoch_done({"loss": 0.5}, "val_accuracy", 0.1406, _better)  # the Seen case
    assert torch.load(tmp_path / "best.pt", weights_only=True)["best"] == 0.1875


class _Records:
    def __init__(self):
        self.rescued_ids = []

    def rescued(self, ids):
        self.rescued_ids.append(ids)


def test_a_failed_rank_saves_its_last_finished_step_once_a_folder_with_the_steps_ids(
    tmp_path, caplog
):
    writer, other = _saver(tmp_path, every=0), _saver(tmp_path, enabled=False, every=0)
    records = _Records()
    for saver in (writer, other):  # a rank that does not write its folder rescues too
        saver.trained(2)
        saver.trained(4)  # an optimizer step of two batches
    other.rescue(records)
    writer.rescue(records)  # the same folder: claimed already
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt-epoch0001-sample00000128.pt"]
    assert records.rescued_ids == [list(range(64, 128))]  # the step's, every rank's
    assert "saved its last finished step" in caplog.text
    state, _ = checkpoint.load_latest(tmp_path)
    assert (state["epoch"], state["samples"]) == (1, 128)
    other.epoch_done({"loss": 0.5})  # a saved state: nothing to rescue
    other.rescue(records)
    assert len(records.rescued_ids) == 1


def test_a_rank_that_failed_while_its_optimizer_stepped_saves_nothing(tmp_path):
    saver = _saver(tmp_path, every=0)
    saver.trained(1)
    saver.stepper.stepping = True  # the weights may be half changed
    saver.rescue(_Records())
    assert checkpoint.checkpoints(tmp_path) == []


def test_a_rescue_that_cannot_write_in_its_bound_leaves_the_last_save(
    tmp_path, monkeypatch, caplog
):
    saver, records = _saver(tmp_path, every=0), _Records()
    saver.epoch_done({"loss": 0.5})
    saver.trained(3)
    monkeypatch.setattr(checkpoint, "RESCUE_S", 0.3)
    monkeypatch.setattr(checkpoint.torch, "save", lambda *_: time.sleep(30))  # a stalled disk
    started = time.monotonic()
    saver.rescue(records)
    assert time.monotonic() - started < 5
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-epoch0002.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert records.rescued_ids == []
    assert "the last finished step was not saved (" in caplog.text
    assert "the next round resumes from the last save" in caplog.text


def test_a_rank_that_failed_in_an_epochs_end_work_saves_every_sample_of_it(tmp_path, caplog):
    saver = _saver(tmp_path, every=0)
    saver.trained(8)  # 8 steps of 32: the epoch's 256, its validation and save still to come
    saver.rescue(_Records())
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt-epoch0001-sample00000256.pt"]
    assert "every sample of epoch 2 trained, its end not saved" in caplog.text
