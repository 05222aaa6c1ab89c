"""Docker Swarm for real: a single-node swarm runs the stack (`make swarm-up`) to completion.

Replaced here: the conda env stage only (the image is built on the stand-in env image).
"""

import time

import pytest

from helpers import sh, wait_until


@pytest.fixture(scope="module")
def swarm(engine):
    state = sh(["docker", "info", "-f", "{{.Swarm.LocalNodeState}}"]).stdout.strip()
    created = state != "active"
    if created:
        sh(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"])
    yield
    if created:
        sh(["docker", "swarm", "leave", "--force"], check=False)


def master_state(stack):
    """The Swarm state of the master's task once it has ended, else an empty string."""
    ps = ["docker", "service", "ps", f"{stack}_master", "--no-trunc", "--format"]
    state = sh([*ps, "{{.CurrentState}}"], check=False).stdout
    return state if state.startswith(("Complete", "Failed", "Rejected", "Shutdown")) else ""


def test_swarm_stack_runs_the_job_to_completion(project, swarm):
    stack = f"{project.name}-swarm"
    # The stack's network must not collide with the one `make up` leaves (<project>_ddp).
    project.compose("create", "--scale", "worker=1")
    try:
        project.make(
            "swarm-up", "ARGS=--epochs 2 --samples 512 --checkpoint-dir /checkpoints/swarm"
        )
        state = wait_until(lambda: master_state(stack), 300, "the master's task ending")
        logs = sh(["docker", "service", "logs", "--raw", f"{stack}_master"]).stdout
        assert state.startswith("Complete"), state + logs[-3000:]
        assert "world size 2" in logs and "final loss" in logs
    finally:
        project.make("swarm-down", check=False)
        network = ["docker", "network", "ls", "-q", "--filter", f"name={stack}_ddp"]
        # The stack's network goes a moment after its services.
        for _ in range(60):
            if not sh(network).stdout.strip():
                break
            time.sleep(1)
