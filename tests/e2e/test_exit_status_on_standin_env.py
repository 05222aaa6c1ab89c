"""The status `make up` reports is the job's: a finished job exits 0 on every node, cleanly; a
failed build starts nothing; an error that a restart cannot fix fails once, with status 2.

Replaced here: the conda env stage only (the runtime stage is built on the stand-in env image,
see scripts/standin-image.sh), except in the failed-build test, which builds the real env stage
from a base image that exists nowhere.
"""

import sys
import time

import pytest

from helpers import TEMPLATE, record, sh


@pytest.mark.parametrize("target", ["up", "test"])
def test_a_failed_build_stops_make_up_and_make_test_before_any_container(project, target):
    # The fixture built an image: there is an older image to be misused.
    project.compose("down", "--remove-orphans")
    result = sh(
        ["make", target, "ENV_IMAGE=env", "CONDA_IMAGE=ddp-template-no-such-base:0"],
        cwd=project.root,
        check=False,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert f"make build: ERROR: the build of {project.name}:latest failed" in out
    assert project.containers() == [], "no container may start from the older image"
    assert "passed" not in out, "the older image ran the tests"
    if target == "up":
        assert not (project.root / "build" / "status").exists(), "no job ran: no status"


def test_a_rebuild_prunes_the_image_it_replaced(project):
    project.compose("down", "--remove-orphans")  # no container keeps the old image in use
    before = sh(["docker", "image", "inspect", "-f", "{{.Id}}", f"{project.name}:latest"])
    script = project.root / "train_dist.py"
    original = script.read_text()
    script.write_text(original + "\n# a code change\n")
    try:
        project.make("build")
        images = sh(["docker", "image", "ls", "-aq", "--no-trunc"]).stdout.split()
    finally:
        script.write_text(original)
        project.make("build")  # back to the image the other tests expect
    assert before.stdout.strip() not in images, "the replaced image is still there"


def test_a_bad_argument_fails_once_with_the_usage_and_status_2(project):
    started = time.monotonic()
    result = project.make("up", "ARGS=--bogus", check=False, timeout=300)
    seconds = time.monotonic() - started
    out = result.stdout + result.stderr
    assert "make up: FAILED: a node exited with status 2" in out, out[-3000:]
    # One usage for the job: no node prints it twice, no torchrun restarts it.
    assert out.count("usage: train_dist.py") == 1, out[-3000:]
    assert out.count("unrecognized arguments: --bogus") == 1
    assert "a usage or data error: not restarted" in out
    assert project.exit_codes() == ["node 2", "node 2", "rendezvous 0"]
    # Docker restarted each node once (RESTART_POLICY on-failure:1); the restarted node read its
    # last status and stopped at once, before torchrun.
    for node in project.compose("ps", "--all", "-q", "node").stdout.split():
        restarts = sh(["docker", "inspect", "-f", "{{.RestartCount}}", node]).stdout.strip()
        assert restarts == "1", node
    assert out.count("not restarting: the last run ended with a usage or data error") == 2, out
    # What a calling script sees: make's own 2, the job's status in build/status.
    assert result.returncode == 2 and (project.root / "build" / "status").read_text() == "2\n"
    record(bad_argument_to_exit_s=round(seconds, 1))


def test_a_missing_data_folder_fails_once_per_node_with_status_2(project):
    result = project.make("up", "ARGS=--data-dir /missing", check=False, timeout=300)
    out = result.stdout + result.stderr
    assert "make up: FAILED: a node exited with status 2" in out, out[-3000:]
    assert out.count("ERROR: data directory /missing does not exist") == 2, out[-3000:]
    assert "world size" not in out, "the job must not start training"
    assert project.exit_codes() == ["node 2", "node 2", "rendezvous 0"]


def test_finished_jobs_end_cleanly_on_every_node(standin):
    """A short `make soak`: three 2-node jobs, each exits 0 on every node with no stack trace
    (`make soak` runs twenty and records them)."""
    soak = [sys.executable, TEMPLATE / "bench" / "soak.py", "--host-runs=0", "--up-runs=3"]
    out = sh(soak, timeout=900).stdout
    assert "soak up: 3 runs, 0 non-zero exits, 0 with a stack trace" in out, out[-3000:]


# A fork's task with the mistakes people make (issue 35); its --bug flag picks one, so that one
# file, and one rebuild of the shared image, serves them all.
MISTAKE = """
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


BUG = ""


def add_arguments(parser):
    parser.add_argument("--bug", default="")


def datasets(args):
    global BUG
    BUG = args.bug
    dtype = torch.float64 if BUG == "float64-data" else torch.float32
    x = torch.randn(256, 8, dtype=dtype)
    return TensorDataset(x, x.sum(1, keepdim=True).float()), None


def model(args):
    return torch.nn.Linear(8, 1)


def optimizer(model, args):
    return torch.optim.SGD(model.parameters(), lr=0.01)


def step(model, batch):
    x, y = batch
    loss = F.mse_loss(model(x), y)
    return (loss.item() if BUG == "float-loss" else loss), dict()
"""
FIXES = {
    "float-loss": "ERROR: step() returned the loss as a float, not a tensor",
    "float64-data": "make datasets() return float32 tensors",
}


@pytest.fixture(scope="module")
def mistake(project):
    """The project with mistake.py beside task.py (TASK=mistake.py), built into its image."""
    task = project.root / "mistake.py"
    task.write_text(MISTAKE)
    yield task.name
    task.unlink()


@pytest.mark.parametrize("bug", list(FIXES))
def test_a_mistake_in_the_task_fails_once_with_what_to_fix_and_status_2(project, mistake, bug):
    started = time.monotonic()
    result = project.make("up", f"TASK={mistake}", f"ARGS=--bug {bug}", check=False, timeout=300)
    seconds = time.monotonic() - started
    out = result.stdout + result.stderr
    assert "make up: FAILED: a node exited with status 2" in out, out[-3000:]
    assert out.count(FIXES[bug]) == 1, out[-3000:]  # once for the job, by one rank
    assert out.count("] world size") == 1, "one attempt: never restarted"
    if bug == "float64-data":  # the task's own lines, not the machinery's
        assert 'mistake.py", line' in out and "in step" in out, out[-3000:]
        assert "train_dist.py" not in out.split("Traceback")[-1], out[-3000:]
    assert FIXES[bug] in (project.root / "logs" / "train.log").read_text()
    record(**{f"task_mistake_to_exit_s_{bug.replace('-', '_')}": round(seconds, 1)})
