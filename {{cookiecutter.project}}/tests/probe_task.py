"""A task for the tests (TASK=tests/probe_task.py): linear regression on dict batches, whose
validation sums tell how often each validation sample was evaluated. Sample i of the validation
set carries 2**i, so the sum over a pass is 2**VAL - 1 exactly when every sample counted once."""

import torch
from torch.utils.data import Dataset

from {{ cookiecutter.package }}.task_helpers import means

VAL = 7
MONITOR, MODE = "mse", "min"


class Points(Dataset):
    def __init__(self, size, seed):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index], "key": torch.tensor(2.0**index)}


def add_arguments(parser):
    parser.add_argument("--points", type=int, default=300)


def datasets(args):
    return Points(args.points, args.seed), Points(VAL, args.seed + 1)


def model(args):
    return torch.nn.Linear(4, 1)


def optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=args.lr)


def step(model, batch):
    error = model(batch["x"]).squeeze(1) - batch["y"]
    return (error**2).mean(), {"mse": (error**2).sum(), "keys": batch["key"].sum()}


def summarize(sums):
    values = means(sums)
    values.update(keys=sums.get("keys", 0.0), count=sums["samples"])
    return values
