"""`make soak`: does a finished job exit 0, cleanly, every time?

Renders the default project (Python 3.11) into build/soak and runs, one after another, its
2-process host job (`torchrun --standalone --nproc-per-node 2 train_dist.py`) HOST_RUNS times
and its 2-node `make up` (on the stand-in env image) UP_RUNS times. A run fails when it exits
non-zero, when it did not finish training, or when its output holds a stack trace or an abort.
Prints the counts and the output of each failed run; exits 1 if any run failed. With --record
the counts go into bench/results.json (key "soak") and bench/results.md.

usage: python bench/soak.py [--host-runs 200] [--up-runs 20] [--record]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1]
RESULTS = TEMPLATE / "bench" / "results.json"
WORK = TEMPLATE / "build" / "soak"
PROJECT = WORK / "ddp-soak"
ENV_IMAGE = os.environ.get("STANDIN_IMAGE", "ddp-template-env:standin")
TRAIN_ARGS = ["--epochs", "3", "--samples", "512", "--batch-size", "32"]
# What a finished job must never print: Python and C++ stacks, aborts, a failed rendezvous close.
TRACE = re.compile(
    r"Traceback|terminate called|frame #\d|Exception raised from|SIGABRT|Signal \d+"
    r"|RendezvousConnectionError|failed to shutdown"
)
# `make up` names every container that exited non-zero, workers too.
CONTAINER_FAILED = re.compile(r"exited with status [1-9]")


def render():
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    cookiecutter = [sys.executable, "-m", "cookiecutter", "--no-input", "-o", str(WORK)]
    answers = ["project=ddp-soak"]
    subprocess.run([*cookiecutter, str(TEMPLATE), *answers], check=True, capture_output=True)


def host_run():
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "data").mkdir()
        folders = [
            f"--data-dir={tmp}/data",
            f"--checkpoint-dir={tmp}/ckpt",
            f"--log-dir={tmp}/logs",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node=2", "train_dist.py", *TRAIN_ARGS, *folders]
        return subprocess.run(
            cmd,
            cwd=PROJECT,
            env={**env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )


def up_run():
    shutil.rmtree(PROJECT / "checkpoints" / "soak", ignore_errors=True)
    args = " ".join([*TRAIN_ARGS, "--checkpoint-dir", "/checkpoints/soak"])
    return subprocess.run(
        ["make", "up", f"ENV_IMAGE={ENV_IMAGE}", f"ARGS={args}"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def soak(name, runs, run_once):
    """Run `run_once` `runs` times; return its figures and the output of the failed runs."""
    failed, traced, seconds, outputs = 0, 0, [], []
    for i in range(runs):
        started = time.perf_counter()
        result = run_once()
        seconds.append(time.perf_counter() - started)
        output = result.stdout + result.stderr
        bad_exit = (
            result.returncode != 0
            or "final loss" not in output
            or CONTAINER_FAILED.search(output) is not None
        )
        trace = TRACE.search(output)
        failed += bad_exit
        traced += bool(trace)
        if bad_exit or trace:
            outputs.append(f"--- {name} run {i + 1}: exit {result.returncode}\n{output[-3000:]}")
        print(
            f"{name} run {i + 1}/{runs}: exit {result.returncode}"
            f"{', ' + repr(trace.group()) if trace else ''}",
            flush=True,
        )
    figures = {"runs": runs, "non_zero_exits": failed, "with_stack_trace": traced}
    if seconds:
        figures["median_s"] = round(statistics.median(seconds), 2)
    return figures, outputs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-runs", type=int, default=200)
    parser.add_argument("--up-runs", type=int, default=20)
    parser.add_argument("--record", action="store_true", help="write bench/results.*")
    args = parser.parse_args(argv)
    render()
    results, outputs = {}, []
    try:
        for name, runs, run_once in (
            ("host", args.host_runs, host_run),
            ("up", args.up_runs, up_run),
        ):
            if runs:
                results[name], failed = soak(name, runs, run_once)
                outputs += failed
    finally:
        if args.up_runs:
            subprocess.run(["make", "clean"], cwd=PROJECT, capture_output=True)
    print("\n".join(outputs))
    for name, r in results.items():
        print(
            f"soak {name}: {r['runs']} runs, {r['non_zero_exits']} non-zero exits, "
            f"{r['with_stack_trace']} with a stack trace"
        )
    if args.record:
        recorded = json.loads(RESULTS.read_text())
        recorded["soak"] = {**recorded.get("soak", {}), **results, "date": time.strftime("%F")}
        RESULTS.write_text(json.dumps(recorded, indent=2) + "\n")
        sys.path.insert(0, str(RESULTS.parent))
        from report import write_report

        write_report(recorded, RESULTS.parent)
    return 1 if outputs else 0


if __name__ == "__main__":
    sys.exit(main())
