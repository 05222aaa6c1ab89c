"""The task: what this project trains. It is the one file a fork edits (or replaces: TASK in .env
names the file, and examples/ holds others); train_dist.py and the machinery in
{{ cookiecutter.package }}/ take care of the ranks, the data each one trains, checkpoints, stops
and restarts.

What train_dist.py calls, on every rank:

    datasets(args) -> (train, val)   map-style datasets (len() and [index]); val may be None.
                                     Map-style so that every sample is trained once per epoch,
                                     whatever the stops and world sizes: the loop deals indices.
    model(args) -> nn.Module         built on the CPU; the loop moves it and wraps it in DDP.
    optimizer(model, args)           the optimizer, with its parameter groups (param_groups, from
                                     task_helpers, applies --weight-decay to weights, not biases
                                     and norms).
                                     The loop sets the groups' learning rate at every step
                                     (--schedule, --warmup-ratio), from the one they start with.
    step(model, batch) -> (loss, sums)
                                     `batch` is collate()'s output, on the training device; in
                                     training `model` is the DDP wrapper: call it, not its other
                                     methods. `loss` is the mean over the batch's samples (the loop
                                     weighs it by the batch's size, so a short last step counts
                                     each sample once); `sums` are extra metrics, each a sum over
                                     the batch (`{"accuracy": correct.sum()}`), added up over
                                     steps and ranks. The loop adds "loss" and "samples" itself.

Optional:
    add_arguments(parser)            the task's own flags: make up ARGS="--image-size 64"
    collate(samples) -> batch        default: torch's default_collate (tuples, dicts, tensors)
    summarize(sums) -> dict          from the sums over an epoch (every rank) to the values
                                     logged; default: each sum / sums["samples"] (a mean)
    MONITOR, MODE                    the validation metric that picks checkpoints/best.pt, and
                                     "min" or "max" (default "loss", "min")

This default: a small CNN on images, from data/train (and data/val) in ImageFolder layout
(data/train/<class>/<image>) when data/train exists, else on synthetic images, so that the job
runs with no download.
"""

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.folders import readable_dir
from {{ cookiecutter.package }}.task_helpers import param_groups, positive

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
MONITOR, MODE = "accuracy", "max"


def add_arguments(parser):
    parser.add_argument(
        "--samples", type=positive(int), default=2048, help="synthetic dataset size"
    )


def datasets(args):
    train_dir, val_dir = Path(args.data_dir) / "train", Path(args.data_dir) / "val"
    if not train_dir.is_dir():
        # Said on every engine: a data folder that was not mounted must not pass unnoticed.
        log.info("no %s: training on %d synthetic images (--samples)", train_dir, args.samples)
        return synthetic(args.samples, seed=args.seed), synthetic(
            max(args.samples // 8, 1), seed=args.seed, split=1
        )
    # torchvision is imported here so that the synthetic path does not pay for it.
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()]
    )
    train = datasets.ImageFolder(readable_dir(train_dir), transform=transform)
    if val_dir.is_dir():
        val = datasets.ImageFolder(readable_dir(val_dir), transform=transform)
        if val.classes != train.classes:
            raise UsageError(f"{val_dir} has classes {val.classes}, {train_dir} {train.classes}")
        return train, val
    return held_out(train, args.seed)


class SmallCNN(nn.Module):
    """Cheap enough to train on one CPU per node, real enough to show DDP at work. No BatchNorm:
    the test that a DDP step equals one process on the whole batch relies on equality."""

    def __init__(self, num_classes: int = 10, channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(32 * 4 * 4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def model(args):
    train_dir = Path(args.data_dir) / "train"
    if not train_dir.is_dir():
        return SmallCNN(10)
    from torchvision.datasets.folder import find_classes

    return SmallCNN(len(find_classes(readable_dir(train_dir))[0]))


def optimizer(model, args):
    return torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9)


def step(model, batch):
    images, labels = batch
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    return loss, {"accuracy": (logits.argmax(1) == labels).sum()}


# Helpers of this task; the examples have their own.


def synthetic(samples: int, num_classes: int = 10, seed: int = 0, split: int = 0):
    """Noisy images around one fixed random pattern per class: learnable, deterministic. Splits
    share the patterns (the classes) and differ in their samples."""
    return Synthetic(samples, num_classes, seed, split)


class Synthetic(Dataset):
    """Each image is made as it is loaded, from a seed of its own, not all at the start: the
    default 16,384 took every rank 1.1 s and 200 MB at each start of a round (a join, a kill)."""

    def __init__(self, samples, num_classes, seed, split):
        generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        if split:
            generator = torch.Generator().manual_seed(seed + 7919 * split)
        self.labels = torch.randint(0, num_classes, (samples,), generator=generator)
        self.seed = (seed, split)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        index = range(len(self))[int(index)]  # IndexError past the end; -1 is the last
        # Python's hash of a tuple of ints is the same in every process and run.
        generator = torch.Generator().manual_seed(hash((*self.seed, index)) & (2**63 - 1))
        noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        label = self.labels[index]
        return 0.5 * self.patterns[label] + noise, label


def held_out(dataset, seed, fraction=0.1):
    """(train, val): a fixed tenth of `dataset` held out for validation, the same on every rank
    and at every start (it depends on the seed alone)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(len(dataset) * fraction)) if len(dataset) > 1 else 0
    return Subset(dataset, order[cut:]), Subset(dataset, order[:cut])
