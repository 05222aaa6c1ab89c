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
import hashlib
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from {{ cookiecutter.package }} import checkpoint, distributed
from {{ cookiecutter.package }}.data import DataError, build_dataset, make_loader
from {{ cookiecutter.package }}.metrics import MetricsLog
from {{ cookiecutter.package }}.model import SmallCNN

log = logging.getLogger("train")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def default_backend():
    """DDP_BACKEND if set; else nccl where this host has a GPU for each of its processes, and gloo
    where it has not (nccl refuses two processes on one GPU)."""
    if os.environ.get("DDP_BACKEND"):
        return os.environ["DDP_BACKEND"]
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus >= processes else "gloo"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=_positive(int), default=3, help="total epochs (default 3)")
    p.add_argument("--batch-size", type=_positive(int), default=64, help="per process (default 64)")
    p.add_argument("--lr", type=_positive(float), default=0.05, help="SGD learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"))
    p.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR", "checkpoints"))
    p.add_argument("--log-dir", default=os.environ.get("LOG_DIR", "logs"))
    p.add_argument("--keep", type=_positive(int), default=3, help="checkpoints to keep")
    p.add_argument("--samples", type=_positive(int), default=2048, help="synthetic dataset size")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["gloo", "nccl"], default=default_backend())
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on GPUs")
    p.add_argument(
        "--timeout",
        type=_positive(int),
        default=120,
        help="seconds a collective waits for a silent peer before failing (default 120)",
    )
    if int(os.environ.get("RANK", 0)) > 0:
        # Every rank gets the same arguments: rank 0 alone prints the usage.
        p.error = lambda message: sys.exit(2)
    return p.parse_args(argv)


def writable_dir(path):
    """Create the folder if needed; refuse one this user cannot write, with a message."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except PermissionError:
        pass
    except FileExistsError:
        raise DataError(f"{path} is a file, not a folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(
            f"{path} is not writable by uid {os.getuid()}: "
            "on the host, chown the folder to the container's APP_UID (make dirs does)"
        )
    return Path(path)


def setup_logging(rank, log_dir):
    """Rank 0 logs INFO to stdout and train.log; other ranks only warnings. Each line names
    the node (hostname) and the rank."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(writable_dir(log_dir) / "train.log"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [{os.uname().nodename} r{rank}] %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def progress_bar(loader, enabled, description):
    """A tqdm bar on a terminal; plain log lines (no bar) anywhere else, e.g. in containers."""
    if not enabled or not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=description, leave=False)


class GracefulStop:
    """Inside `with stop:` (the training loop) a SIGTERM/SIGINT is remembered, so that training
    stops between two steps; outside it they act as usual, so a process that is still joining
    the job, or loading data, exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, device):
        """True on every rank as soon as any rank was asked to stop."""
        return distributed.any_rank(self.signal is not None, device)


def run_epoch(
    model, loader, optimizer, device, skip=0, should_stop=lambda: False, bf16=False, progress=False
):
    """Train one epoch from batch `skip` on.

    Return (sum of losses, correct predictions, samples) on this rank, the number of batches
    done, and whether it stopped early because a stop was requested.
    """
    model.train()
    # On the training device: nccl reduces GPU tensors only, and .item() every step would wait
    # for the GPU every step.
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    step = 0
    for step, (images, labels) in enumerate(progress_bar(loader, progress, "train")):
        if step < skip:
            continue
        if should_stop():
            return totals, step, True
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.numel()
        totals[0] += loss.detach() * n
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += n
    return totals, step + 1, False


def fingerprint(model):
    """A short hash of the weights: equal on every rank if DDP kept them in step."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def check_in_step(model, ddp, world_size):
    """Log each rank's host and weight fingerprint; fail if the weights differ."""
    mine = (os.uname().nodename, fingerprint(model))
    everyone = [None] * world_size
    if ddp:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    log.info("weights by rank: %s", " ".join(f"{r}@{h}={f}" for r, (h, f) in enumerate(everyone)))
    if len({f for _, f in everyone}) != 1:
        raise RuntimeError("ranks ended with different weights")


def pick_device(backend, rank):
    """CPU for gloo; for nccl, GPU `rank mod GPUs`.

    Not LOCAL_RANK: on one host every Compose node sees all GPUs and runs local rank 0, so
    LOCAL_RANK would put every node on GPU 0. With one node per host and NPROC_PER_NODE equal
    to its GPUs, rank mod GPUs is LOCAL_RANK.
    """
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    # Fixed input shapes: let cuDNN pick its fastest kernels once.
    torch.backends.cudnn.benchmark = True
    return device


def train(args, stop):
    """Train; return 0 when done, or the exit code of a requested stop."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group(backend=args.backend, timeout=timedelta(seconds=args.timeout))
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    master_process = rank == 0
    metrics_log = None
    try:
        device = pick_device(args.backend, rank)
        torch.manual_seed(args.seed)
        # Errors a restart cannot fix end every rank with exit code 2: torchrun does not retry.
        with distributed.fail_together(device):
            setup_logging(rank, args.log_dir)
            metrics_log = MetricsLog(args.log_dir, enabled=master_process)
            if master_process:
                writable_dir(args.checkpoint_dir)
            dataset, num_classes, description = build_dataset(
                args.data_dir, args.samples, args.seed
            )
        loader, sampler = make_loader(
            dataset, args.batch_size, rank, world_size, args.seed, args.workers
        )
        model = SmallCNN(num_classes).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        log.info(
            "world size %d, backend %s, host %s, data: %s",
            world_size,
            args.backend,
            os.uname().nodename,
            description,
        )

        # Rank 0 reads the checkpoint and sends it to everyone: the checkpoint folder need not
        # be shared between nodes.
        state, path = (
            checkpoint.load_latest(args.checkpoint_dir) if master_process else (None, None)
        )
        if ddp:
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        start_epoch, start_step, metrics = 0, 0, None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, start_step = state["epoch"], state.get("step", 0)
            if state["loss"] is not None:
                metrics = (state["loss"], state["accuracy"])
            log.info("resumed from %s: epoch %d done, step %d", path, start_epoch, start_step)
        net = DDP(model, device_ids=[device] if device.type == "cuda" else None) if ddp else model

        def save(epoch, step):
            if master_process:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "loss": metrics[0] if metrics else None,
                    "accuracy": metrics[1] if metrics else None,
                }
                return checkpoint.save(state, args.checkpoint_dir, epoch, step, keep=args.keep)

        with stop:
            for epoch in range(start_epoch, args.epochs):
                sampler.set_epoch(epoch)
                started = time.perf_counter()
                skip = start_step if epoch == start_epoch else 0
                totals, step, stopped = run_epoch(
                    net,
                    loader,
                    optimizer,
                    device,
                    skip,
                    lambda: stop.agreed(device),
                    args.bf16,
                    progress=master_process,
                )
                if stopped:
                    saved = save(epoch, step)
                    log.info("stop requested: saved %s at epoch %d step %d", saved, epoch + 1, step)
                    # The rank that got the signal exits with its code; the others fail, so that
                    # torchrun restarts them into a job without the stopped node.
                    return 128 + stop.signal if stop.signal else 1
                if ddp:
                    dist.all_reduce(totals)
                seconds = time.perf_counter() - started
                loss_sum, correct, seen = totals.tolist()
                metrics = (loss_sum / seen, correct / seen)
                save(epoch + 1, 0)
                metrics_log.record(
                    epoch + 1,
                    loss=metrics[0],
                    accuracy=metrics[1],
                    samples_per_s=seen / seconds,
                    world_size=world_size,
                )
                log.info(
                    "epoch %d/%d loss %.4f accuracy %.3f samples/s %.0f",
                    epoch + 1,
                    args.epochs,
                    metrics[0],
                    metrics[1],
                    seen / seconds,
                )
        if metrics is None:
            raise RuntimeError("no epoch ran and no checkpoint holds metrics")
        check_in_step(model, ddp, world_size)
        log.info("final loss %.4f accuracy %.3f", *metrics)
        if device.type == "cuda":
            log.info(
                "peak GPU memory %.0f MiB on %s",
                torch.cuda.max_memory_allocated(device) / 2**20,
                torch.cuda.get_device_name(device),
            )
        return 0
    finally:
        if metrics_log is not None:
            metrics_log.close()


def main(argv=None):
    args = parse_args(argv)
    stop = GracefulStop()
    try:
        return train(args, stop)
    except DataError as err:
        if str(err):  # empty on the ranks that stopped because another found the problem
            print(f"ERROR: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
