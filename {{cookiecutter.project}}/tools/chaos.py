"""`make chaos`: random graceful stops, kills and scale events on the nodes of a `make up`, the
one holding rank 0 included (every other stop or kill aims at it), for a bounded time and from a
seed; then the job must finish, train every sample exactly once (the peers of a killed node save
the last step they finished before they re-form: no periodic save here), and its last checkpoint
must load.

Runs on the host with the Python standard library only: it drives make and docker.
usage: python tools/chaos.py [--seconds 240] [--seed 0] [--nodes 3]
"""

import argparse
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
REPORT_LINE = re.compile(r"epoch (\d+): (\d+) trained, (\d+) missing, (\d+) repeated")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=240, help="how long events are sent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=int, default=3, help="nodes at the start; scale goes 1 to +1")
    p.add_argument("--epochs", type=int, help="default: about the window's length")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    # Epochs long enough that the job outlasts the window on a 1-CPU-per-node machine, so that
    # every kind of event lands on it (3 nodes train about 3,000 samples/s here, 1 node about
    # as many).
    samples = 20000
    args.epochs = args.epochs or max(3, round(args.seconds * 3000 / samples))
    job = (
        f"--epochs {args.epochs} --samples {samples} --batch-size {BATCH} --record-samples"
        " --save-every-steps 0 --checkpoint-dir /checkpoints/chaos"
        " --log-dir /logs/chaos"
    )
    for folder in ("checkpoints/chaos", "logs/chaos"):
        shutil.rmtree(ROOT / folder, ignore_errors=True)
    up = ["make", "--no-print-directory", "up", f"NODES={args.nodes}", f"ARGS={job}"]
    started = time.monotonic()
    # Kills count as failures: enough restarts for all of them.
    running = Background([*up, "MAX_RESTARTS=100"])
    running.wait_for(r"world size \d+")
    events, kills = chaos(rng, args, running, started)
    make("scale", f"NODES={args.nodes}", check=False)  # back to the start's size, if still running
    # Bounded too: a job that cannot finish (say, killed for memory at every start) is stopped.
    status = running.finish(timeout=4 * args.seconds + 300)
    if status is None:
        make("down", check=False)
        print("chaos: FAILED: the job did not finish in time; stopped it (make down)", flush=True)
        return 1
    print(f"chaos: make up exited {status} after {time.monotonic() - started:.0f}s", flush=True)
    return check(status, events, kills, args, up, samples)


def chaos(rng, args, running, started):
    """Events until the window ends or the job does: each kind once first, in a seeded order."""
    kinds = rng.sample(["stop", "kill", "scale"], 3)
    events, kills, aimed = [], [], 0
    while time.monotonic() - started < args.seconds and running.alive():
        time.sleep(rng.uniform(6, 12))
        kind = kinds.pop(0) if kinds else rng.choice(["stop", "kill", "scale", "scale"])
        nodes = sorted(compose("ps", "--status", "running", "--quiet", "node"))
        # The job needs a node left to go on with (MIN_NODES=1).
        if kind != "scale" and len(nodes) < 2:
            kind = "scale"
        if not running.alive():
            break
        if kind == "scale":
            target = rng.randint(1, args.nodes + 1)
            what = f"scale to {target} nodes"
            scaled = make("scale", f"NODES={target}", check=False)
            if scaled.returncode:
                what += f" failed: {scaled.stderr.strip()}"
        else:
            holder = holding_rank_0(nodes)
            aimed += 1
            node = holder if holder and aimed % 2 else rng.choice(nodes)
            subprocess.run(["docker", kind, node], check=False, capture_output=True)
            what = f"{kind} node {node[:12]}" + (" (rank 0)" if node == holder else "")
            if kind == "kill":
                kills.append(current_epoch())
        events.append(f"{kind} rank 0" if "(rank 0)" in what else kind)
        print(f"chaos: {time.monotonic() - started:.0f}s {what}", flush=True)
    return events, kills


def holding_rank_0(nodes):
    """The node (of `nodes`, container names or ids) whose rank 0 logged last: rank 0 logs every
    round's start and every epoch. None when none of them logged as rank 0. The template's bench
    and e2e tests load this from the rendered project."""
    newest = {}
    for node in nodes:
        logs = subprocess.run(
            ["docker", "logs", "--timestamps", "--tail", "300", node],
            capture_output=True,
            text=True,
        )
        stamps = [line.split()[0] for line in logs.stdout.splitlines() if " r0] " in line]
        if stamps:
            newest[node] = max(stamps)
    return max(newest, key=newest.get) if newest else None


def check(status, events, kills, args, up, samples):
    """The job's status, the samples report and a resume from the last checkpoint."""
    report = make("samples-report", "SAMPLES_DIR=logs/chaos/samples", check=False).stdout
    rows = [tuple(map(int, row)) for row in REPORT_LINE.findall(report)]
    resumed = subprocess.run([*up, "MAX_RESTARTS=0"], cwd=ROOT, capture_output=True, text=True)
    loads = resumed.returncode == 0 and f"epoch {args.epochs} done" in resumed.stdout
    kinds = ("stop", "stop rank 0", "kill", "kill rank 0", "scale")
    counts = ", ".join(f"{events.count(kind)} {kind}" for kind in kinds)
    print(
        f"chaos: seed {args.seed}, {len(events)} events ({counts}), make up exited {status};"
        f" {len(rows)} epochs of {samples} samples: {sum(r[2] for r in rows)} missing,"
        f" {sum(r[3] for r in rows)} repeated; the last checkpoint loads:"
        f" {'yes' if loads else 'NO'}",
        flush=True,
    )
    failures = verdict(status, rows, kills, args.epochs, loads)
    if not failures:
        return 0
    print(
        f"chaos: FAILED: {'; '.join(failures)}\n{report}{resumed.stdout[-2000:]}", file=sys.stderr
    )
    return 1


def verdict(status, rows, kills, epochs, loads):
    """What failed, in words (empty: the job passed). `rows`: (epoch, trained, missing, repeated)
    of the samples report; `kills`: the epoch each kill landed in."""
    failures = [] if status == 0 else [f"make up exited {status}"]
    if len(rows) != epochs:
        failures.append(f"{len(rows)} of {epochs} epochs have sample records")
    for epoch, _, missing, repeated in rows:
        if missing:
            failures.append(f"epoch {epoch}: {missing} samples never trained")
        if repeated:
            landed = kills.count(epoch) + kills.count(epoch - 1)
            twice = f"epoch {epoch}: {repeated} samples trained twice ({landed} kills near)"
            failures.append(twice)
    if not loads:
        failures.append("the last checkpoint does not resume to the end")
    return failures


def current_epoch():
    """The newest epoch with sample records (1-based)."""
    epochs = sorted((ROOT / "logs" / "chaos" / "samples").glob("epoch*"))
    return int(epochs[-1].name.removeprefix("epoch")) if epochs else 1


def make(*args, check=True):
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=ROOT,
        check=check,
        capture_output=True,
        text=True,
    )


def compose(*args):
    out = subprocess.run(["docker", "compose", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.split()


class Background:
    """`make up` in the background; its output is printed as it comes."""

    def __init__(self, command):
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.seen = threading.Event()
        self.pattern = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            sys.stdout.write(line)
            if self.pattern and re.search(self.pattern, line):
                self.seen.set()

    def wait_for(self, pattern):
        self.pattern = pattern
        while not self.seen.wait(1):
            if not self.alive():
                sys.exit(f"chaos: make up ended before {pattern!r}")

    def alive(self):
        return self.process.poll() is None

    def finish(self, timeout):
        """make up's status, or None if it was still running after `timeout` seconds."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.reader.join()
        return status


if __name__ == "__main__":
    sys.exit(main())
