"""Train a small image classifier with DistributedDataParallel.

Runs as a plain script (one process) or under torchrun (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment):

    python train_dist.py --epochs 2
    torchrun --standalone --nproc-per-node 2 train_dist.py --epochs 2

Rank 0 logs, writes a checkpoint after every epoch and resumes from the newest one on start.
On SIGTERM or SIGINT (docker stop, Ctrl-C) every rank stops at the same step and rank 0 saves
where it stopped, so the next start loses nothing.
"""

import argparse
import logging
import os
import sys
import time
from contextlib import closing

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from {{ cookiecutter.package }} import checkpoint, distributed
from {{ cookiecutter.package }}.data import DataError, build_dataset, writable_dir
from {{ cookiecutter.package }}.logs import log_gpu_memory, progress, setup_logging
from {{ cookiecutter.package }}.metrics import EpochTotals, MetricsLog
from {{ cookiecutter.package }}.model import SmallCNN
from {{ cookiecutter.package }}.samples import SampleLog
from {{ cookiecutter.package }}.sampling import PAD, make_loader

log = logging.getLogger("train")


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=positive(int), default=3, help="total epochs (default 3)")
    p.add_argument("--batch-size", type=positive(int), default=64, help="per process (default 64)")
    p.add_argument("--lr", type=positive(float), default=0.05, help="SGD learning rate")
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
    p.add_argument("--samples", type=positive(int), default=2048, help="synthetic dataset size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=distributed.default_backend())
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPUs")
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
        help="seconds a collective waits for a silent peer before failing (default 120)",
    )
    if int(os.environ.get("RANK", 0)) > 0:
        # Every rank gets the same arguments: rank 0 alone prints the usage.
        p.error = lambda message: sys.exit(2)
    return p.parse_args(argv)


def run_epoch(model, loader, optimizer, device, stop, bf16, sample_log, saver):
    """Train the rest of an epoch; return this rank's totals, the steps done, and whether it
    stopped early because a stop was agreed."""
    model.train()
    totals = EpochTotals(device)
    steps = 0
    for images, labels, ids in loader:
        if stop.agreed(device):
            return totals, steps, True
        images, labels, real = images.to(device), labels.to(device), (ids != PAD).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
            losses = F.cross_entropy(logits, labels, reduction="none")
            # Padding fills the last step's short ranks and counts for nothing.
            loss = (losses * real).sum() / real.sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals.add(losses, logits, labels, real)
        sample_log.add(ids[ids != PAD])
        steps += 1
        saver.midway(steps)
    return totals, steps, False


def train(args, stop):
    """Train; return 0 when done, or the exit status of a stop that was asked for."""
    # init: one process group across the job's ranks, or none under plain `python`
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = distributed.init(args.backend, args.timeout) if ddp else (0, 1)
    master_process = rank == 0
    device = distributed.pick_device(args.backend, rank)
    torch.manual_seed(args.seed)

    # data: a problem a restart cannot fix ends every rank with status 2
    with distributed.fail_together(device):
        setup_logging(rank, args.log_dir)
        if master_process:
            writable_dir(args.checkpoint_dir)
        dataset, classes, about = build_dataset(args.data_dir, args.samples, args.seed)
    loader, batches = make_loader(
        dataset, args.batch_size, rank, world_size, args.seed, args.workers
    )
    log.info("world size %d, backend %s, data: %s", world_size, args.backend, about)

    # model, resumed from the newest checkpoint: rank 0 reads it and sends it to every rank
    model = SmallCNN(classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    state, path = checkpoint.load_latest(args.checkpoint_dir) if master_process else (None, None)
    state = distributed.from_rank_0(state)
    per_step = args.batch_size * world_size
    start_epoch, consumed, seed, metrics = checkpoint.restore(state, model, optimizer, per_step)
    if seed not in (None, args.seed):
        # The epoch's order comes from the seed: another one would train some samples twice.
        message = f"{path} was trained with --seed {seed}: resume with it, or start afresh"
        raise DataError(message if master_process else "")
    if path:
        log.info(
            "resumed from %s: epoch %d done, %d samples into the next", path, start_epoch, consumed
        )
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if ddp else model

    # loop: an epoch at a time, each saved; a stop asked of any rank ends all at the same step
    stopped = False
    saver = checkpoint.Saver(
        args.checkpoint_dir,
        args.keep,
        args.save_every_steps,
        model,
        optimizer,
        batches,
        metrics,
        enabled=master_process,
    )
    sample_log = SampleLog(args.log_dir, rank, enabled=args.record_samples)
    with stop, closing(MetricsLog(args.log_dir, enabled=master_process)) as metrics_log, sample_log:
        for epoch in range(start_epoch, args.epochs):
            batches.set_epoch(epoch, consumed if epoch == start_epoch else 0)
            sample_log.start(epoch, len(dataset))
            started = time.perf_counter()
            shown = progress(loader, batches, epoch, args.epochs, args.progress_every)
            totals, steps, stopped = run_epoch(
                net, shown, optimizer, device, stop, args.bf16, sample_log, saver
            )
            if stopped:
                saver.stopped(steps)
                break
            metrics = totals.over_ranks(seconds=time.perf_counter() - started)
            saver.epoch_done(metrics)
            metrics_log.record(epoch + 1, args.epochs, metrics)

    # finish: the stop's status, or a check that every rank ended with the same weights
    if stopped:
        return stop.exit_status()
    if metrics is None:
        raise RuntimeError("no epoch ran and no checkpoint holds metrics")
    distributed.check_in_step(model)
    log.info("final loss %.4f accuracy %.3f", metrics["loss"], metrics["accuracy"])
    log_gpu_memory(device)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args, distributed.GracefulStop())
    except DataError as err:
        if str(err):  # empty on the ranks that stopped because another found the problem
            print(f"ERROR: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
