"""Datasets, and the folders a job reads and writes.

An ImageFolder under the data directory is used when there is one (one sub-folder per class);
otherwise a synthetic dataset that a small model can learn, so the job runs with no downloads.
"""

import os
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

IMAGE_SIZE = 32
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


class DataError(Exception):
    """A folder the job reads or writes cannot be used; the message says why."""


def writable_dir(path) -> Path:
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


def synthetic(samples: int, num_classes: int = 10, seed: int = 0) -> TensorDataset:
    """Noisy images around one fixed random pattern per class: learnable, deterministic."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, num_classes, (samples,), generator=generator)
    noise = torch.randn(samples, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    images = 0.5 * patterns[labels] + noise
    return TensorDataset(images, labels)


def has_images(data_dir: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in data_dir.rglob("*") if p.is_file())


def build_dataset(data_dir, samples: int, seed: int = 0):
    """Return (dataset, number of classes, description)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"data directory {data_dir} does not exist")
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is not a directory")
    # pathlib's rglob skips folders it cannot read without a word: check first.
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise DataError(f"data directory {data_dir} is not readable by uid {os.getuid()}")
    found = has_images(data_dir)
    if not found:
        return (
            synthetic(samples, seed=seed),
            10,
            f"synthetic ({samples} samples; no images in {data_dir})",
        )
    # torchvision is imported here so the synthetic path does not pay for it.
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()]
    )
    folder = datasets.ImageFolder(data_dir, transform=transform)
    return folder, len(folder.classes), f"ImageFolder {data_dir} ({len(folder)} images)"
