"""Every kind of task a fork brings trains under `make up` with every guarantee kept: the two
examples (TASK=examples/...) and a user's own file copied over a fresh render's task.py, each
stopped mid-epoch on 3 nodes and resumed on 2 to completion, every sample once
(`make samples-report`), validation metrics logged and best.pt kept. And what a task downloads
lands in cache/, shared by the nodes and kept between runs.

Replaced here: the conda env stage only (see tests/conftest.py). The data is made here: nothing
is downloaded.
"""

import importlib.util
import json
import random
import re
import shutil
from pathlib import Path

import pytest

from helpers import Project, render, wait_until

OWN_TASK = Path(__file__).parent / "tasks" / "sequence_sum.py"


def example_data(project):
    """The generated project's own helpers that make small data for its examples."""
    spec = importlib.util.spec_from_file_location(
        "example_data", project.root / "tests" / "example_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stop_and_resume(project, name, task_args, task=None):
    """`make up NODES=3` stopped (`make down`) once epoch 2 has begun, then `make up NODES=2` to
    the end; returns rank 0's log, the samples report and the metrics rows."""
    folders = f"--checkpoint-dir /checkpoints/{name} --log-dir /logs/{name}"
    args = [f"ARGS=--epochs 3 --record-samples {task_args} {folders}"]
    if task:
        args.append(f"TASK={task}")
    logs = project.root / "logs" / name
    job = project.start_up("NODES=3", *args)
    wait_until(
        lambda: any(f.stat().st_size for f in (logs / "samples" / "epoch0002").glob("*.ids")),
        300,
        "epoch 2 starting",
    )
    project.make("down")
    job.finish()
    stopped = (logs / "train.log").read_text()
    saved = re.search(r"stop requested: saved \S+: epoch \d done, [1-9]\d* of", stopped)
    assert saved, stopped[-3000:]
    resumed = project.make("up", "NODES=2", *args)
    assert "world size 2" in resumed.stdout and "samples into the next" in resumed.stdout
    report = project.make("samples-report", f"SAMPLES_DIR=logs/{name}/samples").stdout
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").open()]
    return resumed.stdout, report, rows


def assert_each_sample_once(report, epochs=3):
    counts = re.findall(r"epoch (\d): (\d+) trained, (\d+) missing, (\d+) repeated", report)
    assert [(int(e), int(m), int(r)) for e, _, m, r in counts] == [
        (e, 0, 0) for e in range(1, epochs + 1)
    ], report
    assert len({trained for _, trained, _, _ in counts}) == 1, report


def assert_validated(rows, project, name, metric):
    ends = [row for row in rows if isinstance(row["epoch"], int)]
    assert [row["epoch"] for row in ends][-2:] == [2, 3], rows
    assert all(f"val_{metric}" in row and "val_loss" in row for row in ends), rows
    assert (project.root / "checkpoints" / name / "best.pt").exists()


@pytest.mark.parametrize("example", ["resnet18", "charlm"])
def test_an_example_stopped_on_three_nodes_resumes_on_two_each_sample_once(project, example):
    data = example_data(project)
    folder = project.root / "data" / "examples"
    if example == "resnet18":
        data.images(folder / "resnet18" / "train", per_class=100, size=72)
        task_args, metric = "--data-dir /data/examples/resnet18 --image-size 64", "accuracy"
        task_args += " --batch-size 8"
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data.text(folder / "text.txt", characters=100_000)
        task_args = "--text /data/examples/text.txt --block-size 32 --stride 4 --width 64"
        task_args, metric = task_args + " --batch-size 32", "perplexity"
    out, report, rows = stop_and_resume(
        project, f"example-{example}", task_args, task=f"examples/{example}.py"
    )
    assert f"task examples/{example}.py" in out
    assert_each_sample_once(report)
    assert_validated(rows, project, f"example-{example}", metric)


@pytest.fixture(scope="module")
def fork(standin, tmp_path_factory):
    """A fresh render whose task.py is replaced by a file of the user's own, and nothing else."""
    root = render(tmp_path_factory.mktemp("fork"), python_version="3.11", project="ddp-e2e-fork")
    shutil.copy(OWN_TASK, root / "task.py")
    rng = random.Random(0)
    lines = [
        ",".join(f"{rng.uniform(-1, 1):.3f}" for _ in range(rng.randint(3, 12)))
        for _ in range(20_000)
    ]
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "sequences.csv").write_text("\n".join(lines) + "\n")
    forked = Project(root, standin)
    forked.make("build", timeout=900)
    yield forked
    forked.make("clean", check=False)


def test_a_users_own_task_copied_over_task_py_keeps_every_guarantee(fork):
    out, report, rows = stop_and_resume(fork, "own", "--batch-size 16")
    assert "task task.py" in out
    assert re.search(r"final loss [0-9.]+ mae [0-9.]+ val_loss [0-9.]+ val_mae [0-9.]+", out), out
    assert_each_sample_once(report)
    assert_validated(rows, fork, "own", "mae")


def test_downloads_land_in_the_shared_cache_and_stay(project):
    probe = (
        "import os, torch.hub; d = torch.hub.get_dir(); os.makedirs(d, exist_ok=True); "
        "open(os.path.join(d, 'probe'), 'w').write(os.environ['HF_HOME']); print(d)"
    )
    code, out = project.run("node", "python", "-c", probe)
    assert code == 0 and out.split()[-1] == "/cache/torch/hub", out
    on_host = project.root / "cache" / "torch" / "hub" / "probe"
    assert on_host.read_text() == "/cache/huggingface"
    code, out = project.run("node", "cat", "/cache/torch/hub/probe")
    assert code == 0 and out.split()[-1] == "/cache/huggingface", out
