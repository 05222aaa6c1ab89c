"""train_dist.py's flags: the loop's own, then the task's (its add_arguments)."""

import argparse
import os
import sys
from pathlib import Path

from {{ cookiecutter.package }} import task_loader
from {{ cookiecutter.package }}.dealing import default_workers
from {{ cookiecutter.package }}.distributed import default_backend, env_rank
from {{ cookiecutter.package }}.steps import PRECISIONS, SCHEDULES
from {{ cookiecutter.package }}.task_helpers import positive

# The project's folder: train_dist.py's, which task paths are relative to.
ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = "Train the task (task.py, or the file TASK names) with DistributedDataParallel."


def task_name(argv=None):
    """--task, else TASK, else the package's task.py."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", default=os.environ.get("TASK") or task_loader.DEFAULT)
    return p.parse_known_args(argv)[0].task


class ShowingDefaults:
    """An argument group whose flags show their default in --help even without help text."""

    def __init__(self, group):
        self.group = group

    def add_argument(self, *names, **options):
        options.setdefault("help", "(default: %(default)s)")
        return self.group.add_argument(*names, **options)

    def __getattr__(self, name):  # set_defaults, add_mutually_exclusive_group, ...
        return getattr(self.group, name)


def parse_args(argv=None, task=None):
    task = task or task_loader.load(task_name(argv), ROOT)
    # Every flag shows its default, the task's own (its set_defaults) included.
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--task",
        default=task.name,
        help="the task: a file relative to this folder (TASK, else task.py)",
    )
    p.add_argument("--epochs", type=positive(int), default=3, help="total epochs")
    p.add_argument("--batch-size", type=positive(int), default=64, help="batch size per process")
    p.add_argument(
        "--lr", type=positive(float), default=0.05, help="learning rate (a task may set its own)"
    )
    p.add_argument("--seed", type=int, default=0, help="what orders the epochs and seeds the data")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"), help="DATA_DIR")
    p.add_argument(
        "--checkpoint-dir",
        default=os.environ.get("CHECKPOINT_DIR", "checkpoints"),
        help="CHECKPOINT_DIR",
    )
    p.add_argument("--log-dir", default=os.environ.get("LOG_DIR", "logs"), help="LOG_DIR")
    p.add_argument("--keep", type=positive(int), default=3, help="checkpoints to keep")
    p.add_argument(
        "--save-every-steps",
        type=int,
        default=500,
        help="also save every N steps into an epoch: a kill loses at most N steps (0: only at "
        "epoch ends and stops)",
    )
    p.add_argument(
        "--val-every-steps",
        type=int,
        default=0,
        help="also validate every N steps into an epoch (0: at epoch ends only)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="DataLoader worker processes (half the CPUs of a process, up to 4)",
    )
    p.add_argument(
        "--backend", choices=["gloo", "nccl"], default=default_backend(), help="DDP_BACKEND"
    )
    loop = p.add_argument_group("the training step (checkpoints keep what each needs)")
    loop.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32, or autocast to bf16 or fp16 (fp16 with a gradient scaler)",
    )
    loop.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # --precision bf16
    loop.add_argument(
        "--accum-steps",
        type=positive(int),
        default=1,
        help="batches per optimizer step (gradient accumulation)",
    )
    loop.add_argument(
        "--clip-grad-norm", type=float, default=0.0, help="clip gradients to this norm (0: off)"
    )
    loop.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="learning rate after the warmup: constant, or a cosine down to 0 at the last epoch",
    )
    loop.add_argument(
        "--warmup-ratio",
        type=float,
        default=0.0,
        help="part of the job's samples over which the learning rate rises from 0 (0: none)",
    )
    loop.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="weight decay, not on biases and norms (the task's optimizer applies it)",
    )
    loop.add_argument("--compile", action="store_true", help="torch.compile the model")
    loop.add_argument(
        "--deterministic",
        action="store_true",
        help="torch's deterministic algorithms, cuDNN benchmark off (slower; docs/training.md)",
    )
    p.add_argument(
        "--progress-every",
        type=float,
        default=30,
        help="without a terminal, log progress every N seconds (0: never)",
    )
    p.add_argument(
        "--record-samples",
        action="store_true",
        help="record the ids each rank trains under LOG_DIR/samples (make samples-report)",
    )
    waits = (
        ("--timeout", 120, "a training step's collective waits for a silent peer"),
        ("--checkpoint-timeout", 1800, "the ranks wait for a checkpoint to be read or written"),
    )
    for flag, seconds, what in waits:
        help = f"seconds {what}"
        p.add_argument(flag, type=positive(int), metavar="SECONDS", default=seconds, help=help)
    task.add_arguments(ShowingDefaults(p.add_argument_group(f"the task's own ({task.name})")))
    if env_rank() > 0:
        # Every rank gets the same arguments: rank 0 alone prints the usage.
        p.error = lambda message: sys.exit(2)
    args = p.parse_args(argv)
    if args.bf16:
        args.precision = "bf16"
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be at least 0 and below 1, got {args.warmup_ratio}")
    return args
