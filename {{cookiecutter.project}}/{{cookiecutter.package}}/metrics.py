"""Metrics: a phase's sums on each rank, added up over the ranks, and rank 0's record of them:
a log line, JSON lines (metrics.jsonl) and TensorBoard events (tb/)."""

import json
import logging
import time
from pathlib import Path

import torch

from {{ cookiecutter.package }}.distributed import gather

log = logging.getLogger(__name__)
# Written by the loop, not by a task's summarize(): shown last, or not at all on the log line.
LOOP_VALUES = ("samples_per_s", "world_size")


class Sums:
    """Named sums of a training epoch or a validation pass on this rank, kept on the training
    device: .item() at every step would make the host wait for the GPU at every step."""

    def __init__(self, device):
        self.device = device
        self.values = {}

    def add(self, name, value):
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float64)
        if name in self.values:
            self.values[name] += value
        else:
            self.values[name] = value.clone() if isinstance(value, torch.Tensor) else value

    def add_batch(self, loss, samples, extra):
        """A batch's share: its mean loss times its samples, its samples, and the task's sums."""
        self.add("loss", loss.detach() * samples)
        self.add("samples", samples)
        for name, value in extra.items():
            self.add(name, value)

    def over_ranks(self):
        """Every sum added up over the ranks (a rank may lack a name: one that had no
        samples). One exchange of a few numbers: meant for the end of a phase."""
        everyone = gather({name: float(value) for name, value in self.values.items()})
        total = {}
        for sums in everyone:
            for name, value in sums.items():
                total[name] = total.get(name, 0.0) + value
        total.setdefault("samples", 0.0)
        return total


def epoch_metrics(summarize, sums, seconds, world_size):
    """An epoch's values: the task's `summarize` of every rank's `sums`, and the loop's own."""
    totals = sums.over_ranks()
    # The slowest rank's time, the same on every rank: each writes the state into its own
    # folder's checkpoint, and equal states must hash equal (resuming.py).
    seconds = max(gather(seconds))
    loop = {"samples_per_s": totals["samples"] / seconds, "world_size": world_size}
    # No sample: a round that resumed at the epoch's end (its last step saved after a failure).
    return {**(summarize(totals) if totals["samples"] else {}), **loop}


def describe(values):
    """`loss 0.1234 accuracy 0.5678 val_loss ... samples/s 5000`: loss first, then the task's
    names as it gave them, validation after training."""
    names = [n for n in values if n not in LOOP_VALUES]
    train = [n for n in names if not n.startswith("val_")]
    ordered = sorted(train, key=lambda n: n != "loss") + sorted(
        (n for n in names if n.startswith("val_")), key=lambda n: n != "val_loss"
    )
    text = " ".join(f"{name} {values[name]:.4f}" for name in ordered)
    if "samples_per_s" in values:
        text += f" samples/s {values['samples_per_s']:.0f}"
    return text


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

    def record(self, epoch, epochs, values, trained, midway=False):
        """Log a line (for an epoch's end; `midway`: a validation inside an epoch, with `epoch`
        the epochs done and the part of the next), and write the values as a JSON line and
        TensorBoard scalars, whose x is the samples the job has trained (`trained`)."""
        if not self.enabled:
            return
        where = f"epoch {epoch:.3f}/{epochs}" if midway else f"epoch {epoch}/{epochs}"
        log.info("%s %s", where, describe(values))
        row = {"epoch": epoch, "trained": trained, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, trained)
            self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def midway(self, epoch, epochs, values, trained):
        """record() of a validation inside an epoch: `epoch` is the epochs done and the part of
        the next."""
        self.record(epoch, epochs, values, trained, midway=True)

    def close(self):
        if self.writer is not None:
            self.writer.close()
