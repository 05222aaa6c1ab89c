"""What a task may use from the machinery: an argparse type for its flags, the optimizer's
parameter groups for --weight-decay, and the default summarize()."""

import argparse


def positive(kind):
    """An argparse type: a number of `kind` above 0."""

    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def param_groups(model, weight_decay):
    """Optimizer parameter groups with `weight_decay` (--weight-decay) on weight matrices and
    kernels only: decaying biases and normalisation scales only pulls them away from their
    working values (nanoGPT and timm split the same way: by dimension)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def means(sums):
    """The default summarize(): each sum per sample."""
    samples = max(sums["samples"], 1)
    return {name: value / samples for name, value in sums.items() if name != "samples"}
