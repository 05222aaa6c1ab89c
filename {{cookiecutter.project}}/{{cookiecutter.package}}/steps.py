"""From batches to optimizer steps: an epoch's training walk, gradient accumulation, mixed
precision, gradient clipping and the learning-rate schedule. The flags take the names users know
from Lightning's Trainer (precision, accumulate, gradient clipping) and Hugging Face's warmup
ratio."""

import math
from contextlib import nullcontext

import torch

from {{ cookiecutter.package }}.health import beating

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("constant", "cosine")


def lr_factor(progress, schedule="constant", warmup=0.0):
    """The learning rate's multiplier once `progress` (0 to 1) of the job's samples are trained:
    a linear warmup over the first `warmup` of them, then constant or a cosine down to 0.

    A function of the samples trained, not of a step count: a resume continues the same curve
    whatever the world size (a step holds batch size x world size x accumulation samples)."""
    if warmup and progress < warmup:
        return progress / warmup
    if schedule == "constant":
        return 1.0
    done = (progress - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))


class Stepper:
    """Turns micro-batches into optimizer steps.

    Every `accum_steps` batches (and at an epoch's end, with fewer) the optimizer steps once;
    DDP's gradient all-reduce runs on the last batch of each group only (no_sync before it). The
    loop weighs each batch's loss by its share of the group's samples, so a group is one large
    batch whatever its parts. fp16 scales the loss (torch.amp.GradScaler, whose state a
    checkpoint keeps); clipping sees the unscaled gradients.
    """

    def __init__(
        self,
        optimizer,
        device,
        ddp=None,
        precision="fp32",
        accum_steps=1,
        clip=0.0,
        schedule="constant",
        warmup=0.0,
        total=1,
    ):
        self.optimizer, self.device, self.ddp, self.total = optimizer, device, ddp, total
        self.dtype = PRECISIONS[precision]
        self.accum_steps, self.clip = accum_steps, clip
        self.schedule, self.warmup = schedule, warmup
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        # True while the optimizer changes the weights (and after a failure there).
        self.stepping = False
        for group in optimizer.param_groups:
            # The task's learning rate, which the schedule scales (torch's schedulers keep it
            # under the same name); a checkpoint's optimizer state brings it back.
            group.setdefault("initial_lr", group["lr"])

    @classmethod
    def from_args(cls, args, optimizer, *, device, ddp, total):
        """A Stepper with train_dist.py's flags (--precision, --accum-steps, ...)."""
        return cls(
            optimizer,
            device,
            ddp,
            precision=args.precision,
            accum_steps=args.accum_steps,
            clip=args.clip_grad_norm,
            schedule=args.schedule,
            warmup=args.warmup_ratio,
            total=total,
        )

    def train(self, net, loader, batches, task, *, stop, sums):
        """Train the rest of an epoch in optimizer steps of `accum_steps` batches, adding each
        batch to `sums` (and beating: health.py); yields (batches done, the step's sample ids)
        after each optimizer step. Ends early once a stop is agreed (stop.stopped), always
        between two optimizer steps, so that a checkpoint never holds half a step's gradients."""
        net.train()
        done, ids_of_step = 0, []
        for batch, ids in beating(loader):
            if done % self.accum_steps == 0 and stop.agreed():
                return
            batches.seed_step(done)
            last = self.ends_group(done + 1, len(batches))
            weight = batches.weight(done, len(ids), self.accum_steps)
            loss, extra = self.backward(net, task, to_device(batch, self.device), weight, last)
            if len(ids):
                sums.add_batch(loss, len(ids), extra)
            done += 1
            ids_of_step.append(ids)
            if last:
                self.step(batches.trained(done))
                yield done, torch.cat(ids_of_step)
                ids_of_step = []

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def ends_group(self, batches_done, batches_in_epoch):
        return batches_done % self.accum_steps == 0 or batches_done == batches_in_epoch

    def backward(self, net, task, batch, weight, last):
        """The task's (loss, sums) for one batch; its gradients, weighed, added to the group's.
        DDP all-reduces them only on the group's `last` batch."""
        quiet = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
        with quiet:
            with self.autocast():
                loss, sums = task.step(net, batch)
            self.scaler.scale(loss * weight).backward()
        return loss, sums

    def step(self, trained):
        """The optimizer step of a group, at the learning rate for `trained` samples of the
        job's `total` (those of this step included)."""
        self.stepping = True
        factor = lr_factor(trained / self.total, self.schedule, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            parameters = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.stepping = False

    def state_dict(self):
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        if state and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def to_device(batch, device):
    """The batch's tensors on the device, in whatever structure the task's collate made."""
    if isinstance(batch, torch.Tensor):
        # From pinned memory (GPUs) the copy runs while the host prepares the next step.
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(value, device) for value in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch
