"""Plot loss and accuracy per epoch from metrics.jsonl: python -m {{ cookiecutter.package }}.plot IN OUT"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in containers or CI
import matplotlib.pyplot as plt  # noqa: E402


def plot(metrics_file, png_file):
    if not Path(metrics_file).exists():
        raise SystemExit(f"ERROR: {metrics_file} not found: train first (make up)")
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line]
    if not rows:
        raise SystemExit(f"ERROR: {metrics_file} holds no metrics yet: train first (make up)")
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["loss"] for r in rows], marker="o")
    left.set(xlabel="epoch", ylabel="loss", title="training loss")
    right.plot(epochs, [r["accuracy"] for r in rows], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="accuracy", title="training accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png_file, dpi=100)
    return png_file


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(f"wrote {plot(sys.argv[1], sys.argv[2])}")
