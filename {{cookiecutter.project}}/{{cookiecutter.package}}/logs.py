"""What a rank prints: log lines that name the node and rank, and a progress bar on a terminal."""

import logging
import os
import sys

import torch

from {{ cookiecutter.package }}.data import writable_dir

log = logging.getLogger(__name__)


def setup_logging(rank, log_dir):
    """Rank 0 logs INFO to stdout and LOG_DIR/train.log; other ranks only warnings."""
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


def progress_bar(loader, description):
    """Rank 0's tqdm bar on a terminal; plain log lines (no bar) anywhere else, e.g. containers."""
    if int(os.environ.get("RANK", 0)) != 0 or not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=description, leave=False)


def log_gpu_memory(device):
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        log.info("peak GPU memory %.0f MiB on %s", peak, torch.cuda.get_device_name(device))
