"""Checkpoints that survive a crash: written to a temporary file, fsynced, then renamed.

A reader never sees a half-written file under the final name; a failed write (a full disk)
leaves the previous checkpoint as it was; and a file that does not load is moved aside, never
deleted, so the one before it is used and the bad one can be inspected.

Names: ckpt-epoch0003.pt after 3 complete epochs; ckpt-epoch0003-sample00002560.pt when the job
stopped 2,560 samples into the 4th epoch (a graceful stop). Older mid-epoch checkpoints,
ckpt-epoch0003-step000040.pt, counted steps of the world size that wrote them; they still load.
"""

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^ckpt-epoch(\d+)(?:-(?:sample|step)(\d+))?\.pt$")


def name(epoch: int, samples: int = 0) -> str:
    if samples == 0:
        return f"ckpt-epoch{epoch:04d}.pt"
    return f"ckpt-epoch{epoch:04d}-sample{samples:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(directory) -> list[Path]:
    """Complete checkpoints in the directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if match := NAME_RE.match(path.name):
            found.append(((int(match.group(1)), int(match.group(2) or 0)), path))
    return [path for _, path in sorted(found)]


def save(state: dict, directory, epoch: int, samples: int = 0, keep: int = 3) -> Path:
    """Write state as the checkpoint of `samples` into epoch `epoch`; keep the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name(epoch, samples)
    tmp = directory / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in checkpoints(directory)[:-keep]:
        old.unlink()
    return final


def state(model, optimizer, position, metrics) -> dict:
    """What a checkpoint holds: enough to go on from `position` (EpochBatches.position) as if
    never stopped."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **position,
        "loss": metrics["loss"] if metrics else None,
        "accuracy": metrics["accuracy"] if metrics else None,
    }


def restore(state, model, optimizer, samples_per_step):
    """Load a checkpoint's state; return the (epoch, samples, seed, metrics) to go on from.

    An older checkpoint counted steps, not samples: its steps are taken to be of the current
    world size and batch size (`samples_per_step`), as the code that wrote it resumed them.
    """
    if state is None:
        return 0, 0, None, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    metrics = None
    if state["loss"] is not None:
        metrics = {"loss": state["loss"], "accuracy": state["accuracy"]}
    samples = state.get("samples", state.get("step", 0) * samples_per_step)
    return state["epoch"], samples, state.get("seed"), metrics


def load_latest(directory):
    """Return (state, path) of the newest checkpoint that loads, or (None, None)."""
    for path in reversed(checkpoints(directory)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as err:  # noqa: BLE001 - any unreadable file is set aside the same way
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            log.warning("checkpoint %s does not load (%s); moved to %s", path, err, aside.name)
    return None, None


class Saver:
    """A run's checkpoints, written by rank 0 alone (DDP keeps the weights equal on every rank):
    at the end of each epoch, every `every` steps into one (0: never), and where a stop left off.
    `batches` (sampling.EpochBatches) says where training stands."""

    def __init__(self, directory, keep, every, model, optimizer, batches, metrics, enabled):
        self.directory, self.keep, self.every = directory, keep, every
        self.model, self.optimizer, self.batches = model, optimizer, batches
        self.metrics, self.enabled = metrics, enabled

    def epoch_done(self, metrics):
        self.metrics = metrics
        self._save(self.batches.position())

    def midway(self, steps):
        if self.every and steps % self.every == 0:
            self._save(self.batches.position(steps))

    def stopped(self, steps):
        where = self.batches.position(steps)
        path = self._save(where)
        if path:
            size = self.batches.size
            log.info(
                "stop requested: saved %s at epoch %d, sample %d of %d",
                path,
                where["epoch"] + 1,
                where["samples"],
                size,
            )

    def _save(self, where):
        if self.enabled:
            state_now = state(self.model, self.optimizer, where, self.metrics)
            return save(state_now, self.directory, where["epoch"], where["samples"], self.keep)
        return None
