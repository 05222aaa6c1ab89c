"""A user's own task, of a kind the examples do not cover (the tests copy it over a fresh
render's task.py and change nothing else): regression on variable-length sequences read from a
CSV file, padded by the task's own collate, with a GRU and the mean absolute error.

data/sequences.csv: one sequence a line, comma-separated numbers; the target is their sum.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

MONITOR, MODE = "mae", "min"


class Sequences(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        values = torch.tensor(self.rows[index], dtype=torch.float32)
        return values, values.sum()


def add_arguments(parser):
    parser.add_argument("--csv", default=None, help="(DATA_DIR/sequences.csv)")
    parser.set_defaults(lr=0.01)


def datasets(args):
    path = Path(args.csv or Path(args.data_dir) / "sequences.csv")
    rows = [[float(v) for v in line.split(",")] for line in path.read_text().splitlines()]
    cut = len(rows) * 9 // 10
    return Sequences(rows[:cut]), Sequences(rows[cut:])


def collate(samples):
    values, targets = zip(*samples, strict=True)
    lengths = torch.tensor([len(v) for v in values])
    return {
        "values": pad_sequence(values, batch_first=True).unsqueeze(-1),
        "lengths": lengths,
        "targets": torch.stack(targets),
    }


class SumReader(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, values, lengths):
        packed = pack_padded_sequence(values, lengths, batch_first=True, enforce_sorted=False)
        _, last = self.gru(packed)
        return self.out(last[-1]).squeeze(-1)


def model(args):
    return SumReader()


def optimizer(model, args):
    return torch.optim.Adam(model.parameters(), lr=args.lr)


def step(model, batch):
    predicted = model(batch["values"], batch["lengths"])
    loss = F.mse_loss(predicted, batch["targets"])
    return loss, {"mae": (predicted - batch["targets"]).abs().sum()}
