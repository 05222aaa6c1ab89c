"""Checkpoints that survive a crash: written to a temporary file, fsynced, then renamed.

A reader never sees a half-written file under the final name; a failed write (a full disk)
leaves the previous checkpoint as it was; and a file that does not load is moved aside, never
deleted, so the one before it is used and the bad one can be inspected.

Names: ckpt-epoch0003.pt after 3 complete epochs; ckpt-epoch0003-step000040.pt when the job
stopped 40 steps into the 4th epoch (a graceful stop).
"""

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^ckpt-epoch(\d+)(?:-step(\d+))?\.pt$")


def name(epoch: int, step: int = 0) -> str:
    return f"ckpt-epoch{epoch:04d}.pt" if step == 0 else f"ckpt-epoch{epoch:04d}-step{step:06d}.pt"


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


def save(state: dict, directory, epoch: int, step: int = 0, keep: int = 3) -> Path:
    """Write state as the checkpoint of (epoch, step); keep only the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name(epoch, step)
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


def state(model, optimizer, epoch: int, step: int, metrics) -> dict:
    """What a checkpoint holds: enough to go on from (epoch, step) as if never stopped."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "loss": metrics["loss"] if metrics else None,
        "accuracy": metrics["accuracy"] if metrics else None,
    }


def restore(state, model, optimizer):
    """Load a checkpoint's state; return the (epoch, step, metrics) to go on from."""
    if state is None:
        return 0, 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    metrics = None
    if state["loss"] is not None:
        metrics = {"loss": state["loss"], "accuracy": state["accuracy"]}
    return state["epoch"], state.get("step", 0), metrics


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
