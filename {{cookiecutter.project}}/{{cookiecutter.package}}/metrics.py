"""Per-epoch metrics from rank 0: JSON lines (metrics.jsonl) and TensorBoard events (tb/)."""

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, log_dir, enabled=True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = Path(log_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is in environment.yml; a trimmed env still trains
            log.warning("tensorboard is not installed: no TensorBoard events, JSON lines only")
        else:
            self.writer = SummaryWriter(log_dir=str(Path(log_dir) / "tb"))

    def record(self, epoch, **values):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
