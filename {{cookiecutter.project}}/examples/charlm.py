"""Example task: a character-level language model (a small causal Transformer) on a text file.

Use it with TASK=examples/charlm.py in .env (or `make up TASK=examples/charlm.py`), or copy it
over task.py and edit from there.

The text: --text, by default examples/data/public-domain.txt (seven of Shakespeare's sonnets,
1609, and Lincoln's Gettysburg Address, 1863: public domain). Point it at your own file (put it
under data/, which every node sees as /data: --text /data/book.txt). The first 90% of the text
trains, the rest validates. A sample is --block-size characters and the same shifted by one;
samples start every --stride characters. Batches are dicts, as a tokenizer would give them.
Logged: loss per character and its perplexity.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.task_helpers import means, param_groups, positive

MONITOR, MODE = "loss", "min"
TEXT = Path(__file__).resolve().parent / "data" / "public-domain.txt"


def add_arguments(parser):
    parser.add_argument("--text", default=str(TEXT), help="a UTF-8 text file")
    parser.add_argument("--block-size", type=positive(int), default=64, help="characters a sample")
    parser.add_argument("--stride", type=positive(int), default=8, help="between two samples")
    parser.add_argument("--layers", type=positive(int), default=2, help="transformer layers")
    parser.add_argument("--width", type=positive(int), default=128, help="embedding width")
    parser.set_defaults(lr=3e-3, weight_decay=0.01)


class Chunks(Dataset):
    def __init__(self, ids, block, stride):
        self.ids, self.block, self.stride = ids, block, stride

    def __len__(self):
        return max(0, (len(self.ids) - self.block - 1) // self.stride + 1)

    def __getitem__(self, index):
        start = index * self.stride
        piece = self.ids[start : start + self.block + 1]
        return {"x": piece[:-1], "y": piece[1:]}


def vocabulary(args):
    path = Path(args.text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--text {path}: {err}") from None
    if len(text) < 2 * (args.block_size + 1):
        raise UsageError(f"--text {path} has {len(text)} characters: too few for --block-size")
    return text, sorted(set(text))


def datasets(args):
    text, chars = vocabulary(args)
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return (
        Chunks(ids[:cut], args.block_size, args.stride),
        Chunks(ids[cut:], args.block_size, args.stride),
    )


class CharTransformer(nn.Module):
    def __init__(self, vocab, block, width, layers, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(block, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        length = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device)
        h = self.embed(x) + self.position[:length]
        return self.head(self.blocks(h, mask=mask, is_causal=True))


def model(args):
    chars = vocabulary(args)[1]
    return CharTransformer(len(chars), args.block_size, args.width, args.layers)


def optimizer(model, args):
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)


def step(model, batch):
    logits = model(batch["x"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["y"].flatten())
    return loss, {}


def summarize(sums):
    values = means(sums)
    values["perplexity"] = math.exp(min(values["loss"], 50))
    return values
