"""Slurm for real: a one-node cluster from Debian's slurm-wlm (scripts/slurm-cluster.sh) runs
slurm/train.sbatch on the host's Python env. Marked `slurm` (tests/conftest.py): it needs root
and apt, so `make test-host` leaves it out. This machine is one node, so the job runs 2 tasks
on it (two torchrun agents, 1 process each: world size 2) instead of one task on each of 2 nodes.
"""

import os
import sys
from pathlib import Path

import pytest

from helpers import TEMPLATE, losses, render, sh


@pytest.fixture(scope="module")
def slurm():
    started = sh(
        ["bash", TEMPLATE / "scripts" / "slurm-cluster.sh", "start"], check=False, timeout=600
    )
    if started.returncode != 0:
        pytest.fail("could not start a one-node Slurm cluster:\n" + started.stdout + started.stderr)
    yield
    sh(["bash", TEMPLATE / "scripts" / "slurm-cluster.sh", "stop"], check=False)


@pytest.fixture(scope="module")
def slurm_project(tmp_path_factory):
    """Rendered for the host's Python env: Slurm runs the job outside any container."""
    return render(tmp_path_factory.mktemp("slurm"), python_version="3.11")


def sbatch(project, args):
    """`sbatch --wait` of slurm/train.sbatch with 2 tasks on the one node; (status, its log)."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "ARGS": args,
    }
    submitted = sh(
        [
            "sbatch",
            "--wait",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "slurm/train.sbatch",
        ],
        cwd=project,
        env=env,
        timeout=600,
        check=False,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    assert job_id.isdigit(), submitted.stdout + submitted.stderr
    return submitted.returncode, (project / "logs" / f"slurm-{job_id}.out").read_text()


def test_sbatch_runs_the_job_with_the_rendezvous_service_on_the_head_node(
    slurm, slurm_project, tmp_path
):
    status, out = sbatch(
        slurm_project,
        f"--epochs 2 --samples 512 --checkpoint-dir {tmp_path}/c --log-dir {tmp_path}/l",
    )
    assert status == 0, out[-3000:]
    assert "2 task(s) on 1 node(s), the rendezvous on " in out, out[-3000:]
    assert "rendezvous: the job's rendezvous is closed" in out, out[-3000:]
    assert "world size 2" in out, out[-3000:]
    assert len(losses(out)) == 2 and "final loss" in out


def test_a_bad_argument_fails_the_slurm_job_once(slurm, slurm_project):
    status, out = sbatch(slurm_project, "--bogus")
    assert status != 0
    # Rank 0 alone prints the usage, and the launcher does not restart a usage error.
    assert out.count("usage: train_dist.py") == 1, out[-3000:]
    assert "a usage or data error: not restarted" in out
