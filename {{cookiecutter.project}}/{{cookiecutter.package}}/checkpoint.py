"""Checkpoints that survive a crash: written to a temporary file, fsynced, then renamed.

A reader never sees a half-written file under the final name, and a file that does not load is
moved aside (never deleted) so the previous one is used and the bad one can be inspected.
"""

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)
NAME = "ckpt-epoch{epoch:04d}.pt"
NAME_RE = re.compile(r"^ckpt-epoch(\d+)\.pt$")


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
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict, directory, epoch: int, keep: int = 3) -> Path:
    """Write state as the checkpoint of `epoch` and keep only the newest `keep` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / NAME.format(epoch=epoch)
    tmp = directory / f".{final.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in checkpoints(directory)[:-keep]:
        old.unlink()
    return final


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
