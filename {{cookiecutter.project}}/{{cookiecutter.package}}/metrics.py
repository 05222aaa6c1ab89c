"""An epoch's totals over every rank, and rank 0's record of them: JSON lines (metrics.jsonl)
and TensorBoard events (tb/)."""

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class EpochTotals:
    """An epoch's sums on this rank, kept on the training device: nccl reduces GPU tensors only,
    and .item() every step would wait for the GPU every step."""

    def __init__(self, device):
        # Three views of one tensor: `+=` adds in place, and one all-reduce sums all three.
        self.loss_sum, self.correct, self.samples = self._sums = torch.zeros(
            3, dtype=torch.float64, device=device
        )

    def add(self, losses, logits, labels, real):
        """A step's per-sample losses; `real` masks out padding."""
        self.loss_sum += (losses.detach() * real).sum()
        self.correct += ((logits.argmax(1) == labels) & real).sum()
        self.samples += real.sum()

    def over_ranks(self, seconds):
        """Mean loss and accuracy, and samples per second, over every rank: one all-reduce."""
        ranks = 1
        if dist.is_initialized():
            dist.all_reduce(self._sums)
            ranks = dist.get_world_size()
        loss_sum, correct, samples = self._sums.tolist()
        samples = max(samples, 1)  # an epoch resumed at its very end trained none
        return {
            "loss": loss_sum / samples,
            "accuracy": correct / samples,
            "samples_per_s": samples / seconds,
            "world_size": ranks,
        }


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

    def record(self, epoch, epochs, values):
        """Log the epoch's line, and write its values as a JSON line and TensorBoard scalars."""
        if not self.enabled:
            return
        log.info(
            "epoch %d/%d loss %.4f accuracy %.3f samples/s %.0f",
            epoch,
            epochs,
            values["loss"],
            values["accuracy"],
            values["samples_per_s"],
        )
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "time": time.time(), **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, epoch)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
