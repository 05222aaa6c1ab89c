"""The validation pass: the task's metrics over every validation sample once, named val_...,
at each epoch's end and every --val-every-steps optimizer steps into one."""

import torch

from {{ cookiecutter.package }} import distributed
from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.health import beating
from {{ cookiecutter.package }}.metrics import Sums
from {{ cookiecutter.package }}.steps import to_device
from {{ cookiecutter.package }}.task_check import check_monitor


class Validator:
    """Validation of `model` on `loader` (None: the task has no validation set, and every pass
    is empty); `every`: batches between passes inside an epoch (0: at epoch ends only), a
    multiple of --accum-steps so that a pass lands between two optimizer steps."""

    def __init__(self, model, loader, task, stepper, every):
        self.model, self.loader, self.task, self.stepper = model, loader, task, stepper
        self.every = every

    def due(self, steps):
        """Whether a pass is due after `steps` batches of this start of the epoch."""
        return self.loader is not None and self.every and steps % self.every == 0

    def run(self):
        """The validation metrics, named val_... (none without a validation set); the task's
        MONITOR must be among them."""
        if self.loader is None:
            return {}
        values = evaluate(self.model, self.loader, self.task, self.stepper)
        if f"val_{self.task.monitor}" not in values:
            # Checked on the first batch already (task_check.py): a summarize() whose names
            # change between calls.
            try:
                check_monitor(self.task, {name.removeprefix("val_"): 0 for name in values})
            except UsageError as err:
                raise UsageError(str(err) if distributed.env_rank() <= 0 else "") from None
        return values


@torch.no_grad()
def evaluate(model, loader, task, stepper):
    """The task's validation metrics (val_...) over every rank: each sample once."""
    distributed.sync_buffers(model)
    model.eval()
    sums = Sums(stepper.device)
    for batch, ids in beating(loader):
        with stepper.autocast():
            loss, extra = task.step(model, to_device(batch, stepper.device))
        sums.add_batch(loss, len(ids), extra)
    model.train()
    totals = sums.over_ranks()
    return {f"val_{name}": value for name, value in task.summarize(totals).items()}
