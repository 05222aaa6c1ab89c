"""Which samples were trained: each rank's record (train_dist.py --record-samples), and the report
that checks every sample of every epoch was trained exactly once.

Records: LOG_DIR/samples/epochNNNN/size (the epoch's sample count) and one file of ids per rank
and start (round<token>-<host>-<pid>-r<rank>.ids, an id a line, written after each step), so that
restarts and other world sizes add files and never overwrite one. When training fails, the rank
that saves the last finished step (checkpoint.Saver.rescue) adds that step's ids, every rank's
(round<token>-<host>-<pid>-rescued.ids): a rank that failed in it, the lost one too, contributed
its gradients to it without living to record it. A round trains each sample of an epoch at most
once, so ids are counted once per round (the token), and a sample in two rounds is repeated.

usage: python -m {{ cookiecutter.package }}.sample_log [--at-least-once] [FOLDER ...]   (make samples-report)
Several folders: the records of several machines' log folders, counted together (make up-node).
"""

import argparse
import os
import sys
from collections import Counter
from pathlib import Path


class SampleLog:
    """A rank's record of the sample ids it trained; does nothing unless enabled."""

    def __init__(self, log_dir, rank, enabled, round_token=0):
        self.folder = Path(log_dir) / "samples"
        self.rank, self.enabled = rank, enabled
        self.prefix = f"round{round_token:016x}-{os.uname().nodename}-{os.getpid()}"
        self.file = None

    def start(self, epoch, size):
        self.close()
        if not self.enabled:
            return
        folder = self.folder / f"epoch{epoch + 1:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (folder / "size").write_text(f"{size}\n")
        self.file = open(folder / f"{self.prefix}-r{self.rank}.ids", "a")  # closed by close()

    def add(self, ids):
        if self.file is not None:
            self.file.write("".join(f"{i}\n" for i in ids.tolist()))
            # A killed rank's record ends at its last whole step.
            self.file.flush()

    def rescued(self, ids):
        """A saved step's ids, every rank's (checkpoint.Saver.rescue), beside this rank's."""
        if self.file is not None:
            path = Path(self.file.name).with_name(f"{self.prefix}-rescued.ids")
            with open(path, "a") as f:
                f.write("".join(f"{i}\n" for i in ids))

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def count(*folders):
    """(epoch, trained, missing, repeated) for each epoch recorded under the folders together."""
    epochs = {}
    for folder in folders:
        for epoch_dir in Path(folder).glob("epoch*"):
            epochs.setdefault(epoch_dir.name, []).append(epoch_dir)
    rows = []
    for name, dirs in sorted(epochs.items()):
        # Written by the epoch's rank 0, on one machine of several.
        size = next(int((d / "size").read_text()) for d in dirs if (d / "size").is_file())
        rounds = {}
        for f in (f for d in dirs for f in d.glob("*.ids")):
            # An older record's name has no round: each file counts as its own.
            key = f.name.split("-", 1)[0] if f.name.startswith("round") else f.name
            rounds.setdefault(key, set()).update(int(i) for i in f.read_text().split())
        times = Counter(i for ids in rounds.values() for i in ids)
        trained = sum(1 for i in times if 0 <= i < size)
        repeated = sum(n - 1 for n in times.values())
        rows.append((int(name.removeprefix("epoch")), trained, size - trained, repeated))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check each epoch trained every sample once.")
    parser.add_argument("folders", nargs="*", default=["logs/samples"], metavar="FOLDER")
    parser.add_argument(
        "--at-least-once",
        action="store_true",
        help="accept repeated samples (a run with kills), not missing ones",
    )
    args = parser.parse_args(argv)
    rows = count(*args.folders)
    if not rows:
        print(
            f"ERROR: no sample records in {' '.join(args.folders)} (train with --record-samples)",
            file=sys.stderr,
        )
        return 2
    failed = False
    for epoch, trained, missing, repeated in rows:
        print(f"epoch {epoch}: {trained} trained, {missing} missing, {repeated} repeated")
        failed |= missing > 0 or (repeated > 0 and not args.at_least_once)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
