"""Plot every metric per epoch from metrics.jsonl, training and validation on the same axes:
python -m {{ cookiecutter.package }}.plot IN OUT"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in containers or CI
import matplotlib.pyplot as plt  # noqa: E402

# Columns that are not metrics of the task.
NOT_PLOTTED = {"epoch", "trained", "time", "samples_per_s", "world_size"}


def plot(metrics_file, png_file):
    if not Path(metrics_file).exists():
        raise SystemExit(f"ERROR: {metrics_file} not found: train first (make up)")
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    if not rows:
        raise SystemExit(f"ERROR: {metrics_file} holds no metrics yet: train first (make up)")
    names = sorted(
        {n.removeprefix("val_") for row in rows for n in row} - NOT_PLOTTED,
        key=lambda n: (n != "loss", n),
    )
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for key, label in ((name, "training"), (f"val_{name}", "validation")):
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.set(xlabel="epoch", title=name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    return png_file


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"wrote {plot(sys.argv[1], sys.argv[2])}")
