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


def nodes_ended(stack):
    """The Swarm states of the training nodes' tasks once every one has ended, else []."""
    ps = ["docker", "service", "ps", f"{stack}_node", "--no-trunc", "--format"]
    states = sh([*ps, "{{.CurrentState}}"], check=False).stdout.split("\n")
    states = [state for state in states if state]
    ended = ("Complete", "Failed", "Rejected", "Shutdown")
    return states if states and all(state.startswith(ended) for state in states) else []


def test_swarm_stack_runs_the_job_to_completion(project, swarm):
    stack = f"{project.name}-swarm"
    # The stack's network must not collide with the one `make up` leaves (<project>_ddp).
    project.compose("create", "--scale", "node=2")
    try:
        project.make(
            "swarm-up",
            "NODES=2",
            "ARGS=--epochs 2 --samples 512 --checkpoint-dir /checkpoints/swarm",
        )
        states = wait_until(lambda: nodes_ended(stack), 300, "the nodes' tasks ending")
        logs = sh(["docker", "service", "logs", "--raw", f"{stack}_node"]).stdout
        assert len(states) == 2 and all(s.startswith("Complete") for s in states), states
        assert "world size 2" in logs and "final loss" in logs, logs[-3000:]
    finally:
        project.make("swarm-down", check=False)
        network = ["docker", "network", "ls", "-q", "--filter", f"name={stack}_ddp"]
        # The stack's network goes a moment after its services.
        for _ in range(60):
            if not sh(network).stdout.strip():
                break
            time.sleep(1)
