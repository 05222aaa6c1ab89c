"""Several machines, no orchestrator: two Compose projects (`make up-node`, host networking) form
one job as two machines would, here on one host.

Replaced here: the conda env stage only (the image is built on the stand-in env image).
"""

from helpers import Running, sh


def test_two_compose_projects_form_one_job_across_machines(project):
    args = "ARGS=--epochs 2 --samples 512 --checkpoint-dir /checkpoints/multihost"
    common = [
        "make",
        "up-node",
        "RDZV_ADDR=127.0.0.1",
        "NODES=2",
        args,
        f"ENV_IMAGE={project.env_image}",
    ]
    first = Running([*common, "NODE=0"], project.root)  # with the rendezvous service
    try:
        # Both on this machine's loopback: the second needs an address of its own.
        second = [*common, "NODE=1", "LOCAL_ADDR=127.0.0.2"]
        second = sh(second, cwd=project.root, timeout=300, check=False)
        first_out = first.finish()
    finally:
        first.process.kill()
        for node in ("0", "1"):
            project.make("down-node", f"NODE={node}", check=False)
    both = first_out + second.stdout + second.stderr  # Compose reports containers on stderr
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert first.returncode == 0, first_out[-3000:]
    assert "world size 2" in both and "final loss" in both
    assert "rendezvous 127.0.0.1:29400 is up" in second.stdout
    for node in ("node0", "node1"):
        assert f"{project.name}-{node}" in both
