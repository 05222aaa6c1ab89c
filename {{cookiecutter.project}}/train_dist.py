"""Train the task with DistributedDataParallel: {{ cookiecutter.package }}/task.py, or the file TASK names.

Runs as a plain script (one process) or under torchrun (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment):

    python train_dist.py --epochs 2
    torchrun --standalone --nproc-per-node 2 train_dist.py --epochs 2 --task examples/charlm.py

Every rank trains its share of each epoch's samples, every sample once whatever the stops and
world sizes; each epoch ends with a validation pass over every validation sample once. Rank 0
logs, writes a checkpoint after every epoch (and best.pt when validation improves) and resumes
from the newest one on start. On SIGTERM or SIGINT (docker stop, Ctrl-C) every rank stops at the
same step and rank 0 saves where it stopped, so the next start loses nothing.
"""

import argparse
import logging
import os
import shutil
import sys
import time
from contextlib import closing
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from {{ cookiecutter.package }} import checkpoint, distributed, tasks
from {{ cookiecutter.package }}.data import DataError, readable_dir, writable_dir
from {{ cookiecutter.package }}.health import beating, resting
from {{ cookiecutter.package }}.logs import log_gpu_memory, progress, setup_logging
from {{ cookiecutter.package }}.metrics import MetricsLog, Sums, describe
from {{ cookiecutter.package }}.samples import SampleLog
from {{ cookiecutter.package }}.sampling import default_workers, make_loader, seed_all, val_loader
from {{ cookiecutter.package }}.steps import PRECISIONS, SCHEDULES, Stepper
from {{ cookiecutter.package }}.tasks import positive

log = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent
NO_COMPILER = "--compile on CPUs needs a C++ compiler (g++, or CXX): add one or leave it out"


MID_EPOCH = (
    "it stopped mid-epoch, and only the same set can finish that epoch with each sample once."
    " Resume with the same data (and --samples), or start afresh (another --checkpoint-dir)"
)


def task_name(argv=None):
    """--task, else TASK, else the package's task.py."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", default=os.environ.get("TASK") or tasks.DEFAULT)
    return p.parse_known_args(argv)[0].task


def parse_args(argv=None, task=None):
    task = task or tasks.load(task_name(argv), ROOT)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--task",
        default=task.name,
        help="the task: a file relative to this folder (default: TASK, else %(default)s)",
    )
    p.add_argument("--epochs", type=positive(int), default=3, help="total epochs (default 3)")
    p.add_argument("--batch-size", type=positive(int), default=64, help="per process (default 64)")
    p.add_argument("--lr", type=positive(float), default=0.05, help="learning rate (the task's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"))
    p.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR", "checkpoints"))
    p.add_argument("--log-dir", default=os.environ.get("LOG_DIR", "logs"))
    p.add_argument("--keep", type=positive(int), default=3, help="checkpoints to keep")
    p.add_argument(
        "--save-every-steps",
        type=int,
        default=500,
        help="also save every N steps into an epoch: a kill loses at most N steps (0: only at "
        "epoch ends and stops; default 500)",
    )
    p.add_argument(
        "--val-every-steps",
        type=int,
        default=0,
        help="also validate every N steps into an epoch (0: at epoch ends only; default 0)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="DataLoader worker processes (default: half the CPUs of a process, up to 4: "
        "%(default)s here)",
    )
    p.add_argument("--backend", choices=["gloo", "nccl"], default=distributed.default_backend())
    loop = p.add_argument_group("the training step (checkpoints keep what each needs)")
    loop.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="fp32, or autocast to bf16 or fp16 (fp16 with a gradient scaler); default fp32",
    )
    loop.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)  # --precision bf16
    loop.add_argument(
        "--accum-steps",
        type=positive(int),
        default=1,
        help="batches per optimizer step (gradient accumulation); default 1",
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
        help="weight decay, not on biases and norms (the task's optimizer applies it; default 0)",
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
        help="without a terminal, log progress every N seconds (0: never; default 30)",
    )
    p.add_argument(
        "--record-samples",
        action="store_true",
        help="record the ids each rank trains under LOG_DIR/samples (make samples-report)",
    )
    p.add_argument(
        "--timeout",
        type=positive(int),
        default=120,
        help="seconds a training step's collective waits for a silent peer (default 120)",
    )
    p.add_argument(
        "--checkpoint-timeout",
        type=positive(int),
        default=1800,
        help="seconds the ranks wait for a checkpoint to be read or written (default 1800)",
    )
    task.add_arguments(p.add_argument_group(f"the task's own ({task.name})"))
    if int(os.environ.get("RANK", 0)) > 0:
        # Every rank gets the same arguments: rank 0 alone prints the usage.
        p.error = lambda message: sys.exit(2)
    args = p.parse_args(argv)
    if args.bf16:
        args.precision = "bf16"
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be at least 0 and below 1, got {args.warmup_ratio}")
    return args


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


def run_epoch(net, loader, batches, stepper, task, stop, after_step, device):
    """Train the rest of an epoch in optimizer steps of --accum-steps batches, calling
    after_step(batches done, their sample ids) after each; return this rank's sums, the batches
    done, and whether it stopped early because a stop was agreed (always between two optimizer
    steps, so that a checkpoint never holds half a step's gradients)."""
    net.train()
    sums, done, ids_of_step = Sums(device), 0, []
    for batch, ids in loader:
        if done % stepper.accum_steps == 0 and stop.agreed():
            return sums, done, True
        seed_all(batches.seed, batches.rank, batches.trained(done))
        last = stepper.ends_group(done + 1, len(batches))
        # DDP averages the ranks' gradients: weighing each rank's mean by its share of the
        # step's samples makes a short step count every sample once, as one process would (and
        # a rank that got only padding count for nothing).
        weight = len(ids) * batches.world_size / batches.group_samples(done, stepper.accum_steps)
        loss, extra = stepper.backward(net, task, to_device(batch, device), weight, last)
        if len(ids):
            sums.add_batch(loss, len(ids), extra)
        done += 1
        ids_of_step.append(ids)
        if last:
            stepper.step(batches.trained(done))
            after_step(done, torch.cat(ids_of_step))
            ids_of_step = []
    return sums, done, False


@torch.no_grad()
def evaluate(model, loader, task, stepper, device):
    """The task's validation metrics (val_...) over every rank: each sample once."""
    distributed.sync_buffers(model)
    model.eval()
    sums = Sums(device)
    for batch, ids in beating(loader):
        with stepper.autocast():
            loss, extra = task.step(model, to_device(batch, device))
        sums.add_batch(loss, len(ids), extra)
    model.train()
    totals = sums.over_ranks()
    return {f"val_{name}": value for name, value in task.summarize(totals).items()}


def train(args, task, stop):
    """Train; return 0 when done, or the exit status of a stop that was asked for."""
    # init: one process group across the job's ranks, or none under plain `python`
    ddp = int(os.environ.get("RANK", -1)) != -1
    resting()  # a re-formed round starts here: its rendezvous and load have their own bounds
    if ddp:
        rank, world_size = distributed.init(args.backend, args.timeout, args.checkpoint_timeout)
    else:
        rank, world_size = 0, 1
    master_process = rank == 0
    device = distributed.pick_device(args.backend, rank, args.deterministic)
    seed_all(args.seed)

    # data: the task's datasets; a problem a restart cannot fix ends every rank with status 2
    with distributed.fail_together():
        setup_logging(rank, args.log_dir)
        if master_process:
            writable_dir(args.checkpoint_dir)
        readable_dir(args.data_dir)
        train_set, val_set = task.datasets(args)
    shape = dict(workers=args.workers, collate=task.collate, pin=device.type == "cuda")
    loader, batches = make_loader(train_set, args.batch_size, rank, world_size, args.seed, **shape)
    val = None
    if val_set is not None and len(val_set):
        val = val_loader(val_set, args.batch_size, rank, world_size, **shape)
    log.info(
        "world size %d, backend %s, task %s: %d training samples, %d validation",
        world_size,
        args.backend,
        task.name,
        len(train_set),
        len(val_set) if val else 0,
    )

    # model and its step, resumed from the newest checkpoint: rank 0 reads it and sends it to
    # every rank
    seed_all(args.seed)
    model = task.model(args).to(device)
    optimizer = task.optimizer(model, args)
    ddp_net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if ddp else None
    stepper = Stepper(
        optimizer,
        device,
        ddp_net,
        args.precision,
        args.accum_steps,
        args.clip_grad_norm,
        args.schedule,
        args.warmup_ratio,
        total=args.epochs * len(train_set),
    )
    state, path = None, None
    with distributed.fail_together():
        if master_process:
            state, path = checkpoint.load_latest(args.checkpoint_dir)
    state = distributed.from_rank_0(state)
    resumed = checkpoint.restore(state, model, optimizer, args.batch_size * world_size)
    stepper.load_state_dict(state)
    distributed.wait_for_rank_0()  # and for every other rank to have unpacked the checkpoint
    if resumed.seed not in (None, args.seed):
        # The epoch's order comes from the seed: another one would train some samples twice.
        message = f"{path} was trained with --seed {resumed.seed}: resume with it, or start afresh"
        raise DataError(message if master_process else "")
    if resumed.size not in (None, len(train_set)):
        now = len(train_set)
        changed = f"{path} was trained on {resumed.size} samples an epoch; there are {now}"
        if resumed.samples:
            # Which samples the epoch's first part held depends on its size: the rest of it
            # would train some twice and miss others.
            raise DataError(f"{changed}: {MID_EPOCH}" if master_process else "")
        log.warning("%s: the next epoch deals the new set", changed)
    if path:
        log.info(
            "resumed from %s: epoch %d done, %d samples into the next",
            path,
            resumed.epoch,
            resumed.samples,
        )
    net = ddp_net or model
    if args.compile:
        if device.type == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            raise DataError(NO_COMPILER if master_process else "")
        net = torch.compile(net)

    # loop: an epoch at a time, validated and saved; a stop asked of any rank ends all at the
    # same step
    stopped, metrics = False, resumed.metrics
    # Saves and validation inside an epoch count optimizer steps.
    saver = checkpoint.Saver(
        args.checkpoint_dir,
        args.keep,
        args.save_every_steps * args.accum_steps,
        model,
        optimizer,
        batches,
        resumed,
        enabled=master_process,
        extra=stepper.state_dict,
    )
    sample_log = SampleLog(args.log_dir, rank, enabled=args.record_samples)
    with stop, closing(MetricsLog(args.log_dir, enabled=master_process)) as metrics_log, sample_log:

        def validate():
            """The validation metrics, named val_...; the monitored one must be among them."""
            values = evaluate(model, val, task, stepper, device)
            if f"val_{task.monitor}" not in values:
                message = f"the task's MONITOR {task.monitor!r} is not one of {sorted(values)}"
                raise DataError(message if master_process else "")
            return values

        def best(values, steps=None):
            monitored = f"val_{task.monitor}"
            saver.validated(monitored, values[monitored], task.better, steps)

        def after_step(steps, ids):
            sample_log.add(ids)
            saver.midway(steps)
            every = args.val_every_steps * args.accum_steps
            if val and every and steps % every == 0:
                values, trained = validate(), batches.trained(steps)
                metrics_log.record(trained / len(train_set), args.epochs, values, trained, True)
                best(values, steps)

        for epoch in range(resumed.epoch, args.epochs):
            batches.set_epoch(epoch, resumed.samples if epoch == resumed.epoch else 0)
            sample_log.start(epoch, len(train_set))
            started = time.perf_counter()
            shown = beating(progress(loader, batches, epoch, args.epochs, args.progress_every))
            sums, steps, stopped = run_epoch(
                net, shown, batches, stepper, task, stop, after_step, device
            )
            if stopped:
                saver.stopped(steps)
                break
            totals = sums.over_ranks()
            metrics = {
                **task.summarize(totals),
                "samples_per_s": totals["samples"] / (time.perf_counter() - started),
                "world_size": world_size,
            }
            values = validate() if val else {}
            metrics.update(values)
            saver.epoch_done(metrics)
            metrics_log.record(epoch + 1, args.epochs, metrics, (epoch + 1) * len(train_set))
            if values:
                best(values)

    # finish: the stop's status, or a check that every rank ended with the same weights
    if stopped:
        return stop.exit_status()
    if metrics is None:
        raise RuntimeError("no epoch ran and no checkpoint holds metrics")
    distributed.sync_buffers(model)
    distributed.check_in_step(model)
    log.info("final %s", describe(metrics))
    log_gpu_memory(device)
    return 0


def main(argv=None):
    try:
        task = tasks.load(task_name(argv), ROOT)
        args = parse_args(argv, task)
        return train(args, task, distributed.GracefulStop())
    except DataError as err:
        if str(err):  # empty on the ranks that stopped because another found the problem
            print(f"ERROR: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
