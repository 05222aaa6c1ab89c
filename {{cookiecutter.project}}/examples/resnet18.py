"""Example task: torchvision's ResNet-18 (weights=None) on your images.

Use it with TASK=examples/resnet18.py in .env (or `make up TASK=examples/resnet18.py`), or copy
it over task.py and edit from there.

Data, in ImageFolder layout: data/train/<class>/<image> and, if there is one, data/val/<class>/...;
without data/val a fixed tenth of data/train is held out (the same on every rank and restart).
Training images get a random resized crop and a flip; all are normalised with ImageNet's mean
and standard deviation, as torchvision's ResNet recipes do. --image-size 224 by default; not
below 64: smaller images leave 1x1 maps at the last BatchNorm, which cannot train a batch of one
sample (a short last step can give a rank one).

BatchNorm: plain BatchNorm by default. Each rank normalises with the statistics of its own batch,
and DDP gives every rank rank 0's running statistics at the start of each step (the loop does
the same before validation and the final check), which is also torchvision's reference recipe
unless --sync-bn. That is sound with per-rank batches of 32 or more, and costs no communication.
--sync-bn converts the model to SyncBatchNorm: statistics over the whole global batch, for small
per-GPU batches, at the cost of an all-reduce in every BatchNorm layer of every forward and
backward pass. torch runs SyncBatchNorm on GPUs only (nccl).
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.folders import readable_dir
from {{ cookiecutter.package }}.task_helpers import param_groups

MONITOR, MODE = "accuracy", "max"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_arguments(parser):
    parser.add_argument("--image-size", type=image_size, default=224, help="64 or more")
    parser.add_argument(
        "--sync-bn", action="store_true", help="SyncBatchNorm across ranks (GPUs only)"
    )
    parser.set_defaults(lr=0.1, weight_decay=1e-4)


def image_size(text):
    size = int(text)
    if size < 64:
        raise argparse.ArgumentTypeError(f"must be 64 or more, got {text}")
    return size


def datasets(args):
    from torchvision import datasets, transforms

    size = args.image_size
    normalise = transforms.Normalize(MEAN, STD)
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    plain = transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            normalise,
        ]
    )
    train_dir, val_dir = folders(args)
    if val_dir.is_dir():
        return (
            datasets.ImageFolder(train_dir, transform=augment),
            datasets.ImageFolder(readable_dir(val_dir), transform=plain),
        )
    # The same images twice, with each split's own transform.
    train, val = (datasets.ImageFolder(train_dir, transform=t) for t in (augment, plain))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    cut = max(1, len(train) // 10)
    held_out = order[:cut].tolist()
    return torch.utils.data.Subset(train, order[cut:].tolist()), torch.utils.data.Subset(
        val, held_out
    )


def model(args):
    from torchvision.datasets.folder import find_classes
    from torchvision.models import resnet18

    classes = find_classes(folders(args)[0])[0]
    net = resnet18(weights=None, num_classes=len(classes))
    if args.sync_bn:
        if args.backend != "nccl":
            raise UsageError("--sync-bn needs GPUs (backend nccl): SyncBatchNorm runs on GPUs only")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return net


def optimizer(model, args):
    return torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9)


def step(model, batch):
    """Cross-entropy; `accuracy` counts the right predictions (summarize divides by samples)."""
    images, labels = batch
    logits = model(images)
    right = (logits.argmax(1) == labels).sum()
    return F.cross_entropy(logits, labels), {"accuracy": right}


def folders(args):
    train_dir = Path(args.data_dir) / "train"
    if not train_dir.is_dir():
        raise UsageError(
            f"{train_dir} does not exist: this task trains on data/train/<class>/<image> "
            "(and data/val/<class>/<image> if present)"
        )
    return readable_dir(train_dir), Path(args.data_dir) / "val"
