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
        "MASTER_ADDR=127.0.0.1",
        "NODES=2",
        args,
        f"ENV_IMAGE={project.env_image}",
    ]
    master = Running([*common, "NODE=0"], project.root)
    try:
        worker = sh([*common, "NODE=1"], cwd=project.root, timeout=300, check=False)
        master_out = master.finish()
    finally:
        master.process.kill()
        for node in ("0", "1"):
            project.make("down-node", f"NODE={node}", check=False)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    assert master.returncode == 0, master_out[-3000:]
    assert "world size 2" in master_out and "final loss" in master_out
    assert "master 127.0.0.1:29400 is up" in worker.stdout
    for node in ("node0", "node1"):
        assert f"{project.name}-{node}" in master_out + worker.stdout
