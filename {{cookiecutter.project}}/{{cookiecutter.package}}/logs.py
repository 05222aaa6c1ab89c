"""What a rank prints: log lines that name the node and rank, and progress (a bar on a terminal,
a line every few seconds elsewhere)."""

import json
import logging
import os
import sys
import time
import traceback

import torch

from {{ cookiecutter.package }}.distributed import env_rank
from {{ cookiecutter.package }}.folders import writable_dir

log = logging.getLogger(__name__)


_errors = None  # LOG_DIR/train.log, where every rank's errors go too (report)


def setup_logging(rank, log_dir):
    """Rank 0 logs INFO to stdout and LOG_DIR/train.log; other ranks only warnings."""
    global _errors
    _errors = os.path.join(log_dir, "train.log")
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


def progress(loader, batches, epoch, epochs, every):
    """Rank 0's progress through an epoch: a tqdm bar on a terminal; without one (containers,
    Slurm, Kubernetes) a log line every `every` seconds (0: none), with samples/s and the time
    the epoch and the job still need."""
    if env_rank() > 0:
        return loader
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}", leave=False)
    return logged_progress(loader, batches, epoch, epochs, every) if every > 0 else loader


def logged_progress(loader, batches, epoch, epochs, every):
    steps = -(-batches.size // batches.per_step)  # of a whole epoch
    done = batches.consumed // batches.per_step  # before this start (a resume mid-epoch)
    started = last = time.monotonic()
    for step, item in enumerate(loader, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every:
            last = now
            per_second = step / (now - started)
            epoch_left = (steps - done - step) / per_second
            job_left = epoch_left + (epochs - epoch - 1) * steps / per_second
            log.info(
                "epoch %d/%d step %d/%d, %.0f samples/s, ETA epoch %s, job %s",
                epoch + 1,
                epochs,
                done + step,
                steps,
                per_second * batches.per_step,
                clock(epoch_left),
                clock(job_left),
            )


def clock(seconds):
    """1:02:03, or 2:03 under an hour."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def log_gpu_memory(device):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        log.info("peak GPU memory %.0f MiB on %s", peak, torch.cuda.get_device_name(device))


def report(text):
    """An error that ends the job, said once (by the rank that found it): on stderr and in
    LOG_DIR/train.log."""
    print(text, file=sys.stderr, flush=True)
    _append(text)


def record_failure(err):
    """An exception nobody expected: its traceback goes to torchrun's error file for this rank,
    from which the node prints the first failing rank's once (launcher/node.py), whatever the
    start method; printed here where no agent reads it (a plain `python train_dist.py`). Call it
    where `err` is being handled."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        # torch's format (ErrorHandler.record_exception), and the time to the microsecond: the
        # rank whose peer failed fails within the same second, and torch keeps whole seconds.
        now = time.time()
        callstack = "".join(traceback.format_exception(err))
        info = {"py_callstack": callstack, "timestamp": str(int(now))}
        message = {"message": f"{type(err).__name__}: {err}", "extraInfo": {**info, "time": now}}
        with open(path, "w") as f:
            json.dump({"message": message}, f)
    else:
        report("".join(traceback.format_exception(err)).rstrip())


def _append(text):
    if not _errors:
        return
    stamp = f"{time.strftime('%H:%M:%S')} [{os.uname().nodename} r{max(env_rank(), 0)}]"
    try:
        with open(_errors, "a") as f:
            f.write(f"{stamp} {text}\n")
    except OSError:
        pass  # the message is on stderr: a log folder that went away must not hide it
