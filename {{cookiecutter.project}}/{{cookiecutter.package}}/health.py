"""The node's health (docker/healthcheck.sh, for Compose's healthcheck and Kubernetes' liveness
probe): local rank 0 touches HEALTH_FILE as training and validation batches go by, at most once
a second. A rank stuck in a collective, or a node that stopped making steps, leaves the file to
age; the check fails once it is HEALTH_TIMEOUT seconds old. Without HEALTH_FILE (the host, a plain
`python train_dist.py`) nothing is written."""

import os
import time
from pathlib import Path


def beating(batches, every=1.0):
    """`batches`, touching HEALTH_FILE (local rank 0 only) before each, at most every `every` s."""
    path = os.environ.get("HEALTH_FILE")
    if not path or int(os.environ.get("LOCAL_RANK", 0)) != 0:
        yield from batches
        return
    path, last = Path(path), float("-inf")
    for item in batches:
        now = time.monotonic()
        if now - last >= every:
            last = now
            try:
                path.touch()
            except OSError:
                pass  # health is advice to the engine: never a reason to stop training
        yield item
