"""The node's health (docker/healthcheck.sh, for Compose's healthcheck and Kubernetes' liveness
probe): local rank 0 touches HEALTH_FILE as training and validation batches go by, at most once
a second. A rank stuck in a collective, or a node that stopped making steps, leaves the file to
age; the check fails once it is HEALTH_TIMEOUT seconds old. Phases with a bound of their own (a
process's start and its rendezvous round, a checkpoint's save) forget the heartbeat: no file reads
as "starting", so a node saving a large checkpoint is not taken for a hung one. Without
HEALTH_FILE (the host, a plain `python train_dist.py`) nothing is written."""

import os
import time
from pathlib import Path


def _path():
    path = os.environ.get("HEALTH_FILE")
    if path and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        return Path(path)
    return None


def resting():
    """Local rank 0 forgets the heartbeat until its next batch: what follows has its own bound."""
    path = _path()
    if path:
        path.unlink(missing_ok=True)


def beating(batches, every=1.0):
    """`batches`, touching HEALTH_FILE (local rank 0 only) before each, at most every `every` s."""
    path, last = _path(), float("-inf")
    if not path:
        yield from batches
        return
    for item in batches:
        now = time.monotonic()
        if now - last >= every:
            last = now
            try:
                path.touch()
            except OSError:
                pass  # health is advice to the engine: never a reason to stop training
        yield item
