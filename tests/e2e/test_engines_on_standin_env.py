"""Beyond one host, with real containers: a single-node Docker Swarm runs the stack, and two
Compose projects (`make up-node`, host networking) form one job as two machines would.

Replaced here: the conda env stage only (the image is built on the stand-in env image).
"""

import subprocess
import time

import pytest

from helpers import sh


@pytest.fixture(scope="module")
def swarm(engine):
    state = sh(["docker", "info", "-f", "{{.Swarm.LocalNodeState}}"]).stdout.strip()
    created = state != "active"
    if created:
        sh(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"])
    yield
    if created:
        sh(["docker", "swarm", "leave", "--force"], check=False)


def test_build(project):
    project.make("build", timeout=900)


def test_swarm_stack_runs_the_job_to_completion(project, swarm):
    stack = project.name
    try:
        project.make(
            "swarm-up", "ARGS=--epochs 2 --samples 512 --checkpoint-dir /checkpoints/swarm"
        )
        deadline = time.monotonic() + 300
        while True:
            state = sh(
                [
                    "docker",
                    "service",
                    "ps",
                    f"{stack}_master",
                    "--no-trunc",
                    "--format",
                    "{{.CurrentState}}",
                ],
                check=False,
            ).stdout
            if state.startswith(("Complete", "Failed", "Rejected", "Shutdown")):
                break
            assert time.monotonic() < deadline, state
            time.sleep(3)
        logs = sh(["docker", "service", "logs", "--raw", f"{stack}_master"]).stdout
        assert state.startswith("Complete"), state + logs[-3000:]
        assert "world size 2" in logs and "final loss" in logs
    finally:
        project.make("swarm-down", check=False)
        deadline = time.monotonic() + 60
        while sh(["docker", "network", "ls", "-q", "--filter", f"name={stack}_ddp"]).stdout.strip():
            if time.monotonic() > deadline:
                break
            time.sleep(1)


def test_two_compose_projects_form_one_job_across_machines(project):
    args = "ARGS=--epochs 2 --samples 512 --checkpoint-dir /checkpoints/multihost"
    common = [
        "make",
        "up-node",
        "MASTER_ADDR=127.0.0.1",
        "NODES=2",
        args,
        f"ENV_IMAGE={project.env_image}",
    ]
    master = subprocess.Popen(
        [*common, "NODE=0"],
        cwd=project.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        worker = sh([*common, "NODE=1"], cwd=project.root, timeout=300, check=False)
        master_out, _ = master.communicate(timeout=300)
    finally:
        master.kill()
        for node in ("0", "1"):
            project.make("down-node", f"NODE={node}", check=False)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert master.returncode == 0, master_out[-3000:]
    assert "world size 2" in master_out and "final loss" in master_out
    assert "master 127.0.0.1:29400 is up" in worker.stdout
    for node in ("node0", "node1"):
        assert f"{project.name}-{node}" in master_out + worker.stdout
