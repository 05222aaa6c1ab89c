"""Several machines, no orchestrator, no shared disk: two copies of the project folder (each with
its own checkpoints/ and logs/), each running `make up-node` with host networking and an address
of its own, form one job as two machines would, here on one host.

Replaced here: the conda env stage only (the image is built on the stand-in env image).
"""

import re
import shutil
import subprocess
import sys

from helpers import Running, sh

ARGS = (
    "ARGS=--epochs 3 --samples 4096 --batch-size 8 --record-samples"
    " --checkpoint-dir /checkpoints/machines --log-dir /logs/machines"
)


def resumed_at(out):
    return [(int(e), int(s)) for e, s in re.findall(r"epoch (\d+) done, (\d+) samples into", out)]


def up_node(root, project, node, address, *extra):
    return [
        "make",
        "--no-print-directory",
        "up-node",
        "RDZV_ADDR=127.0.0.1",
        "NODES=2",
        ARGS,
        f"NODE={node}",
        f"LOCAL_ADDR={address}",
        f"ENV_IMAGE={project.env_image}",
        *extra,
    ]


def test_rank_0_stopped_and_brought_back_on_machines_without_a_shared_disk_loses_nothing(
    project, tmp_path
):
    # Machine b: a copy of the project without its outputs, as a clone on another machine.
    other = tmp_path / project.name
    outputs = shutil.ignore_patterns("checkpoints", "logs", "cache", "build")
    shutil.copytree(project.root, other, ignore=outputs)
    folders = {"a": project.root, "b": other}
    for root in folders.values():
        shutil.rmtree(root / "checkpoints" / "machines", ignore_errors=True)
        shutil.rmtree(root / "logs" / "machines", ignore_errors=True)
    # Machine a (NODE=0: it also runs the rendezvous service); its address sorts first, so its
    # node holds rank 0 in the first round.
    a = Running(up_node(project.root, project, 0, "127.0.0.2"), project.root)
    b = None
    try:
        a.read_until(r"make up-node: run id (\S+);")
        run_id = re.search(r"run id (\S+);", a.lines[-1]).group(1)
        b = Running(up_node(other, project, 1, "127.0.0.3", f"RUN_ID={run_id}"), other)
        a.read_until(r"r0\] epoch 1/3 ")
        # Stopped in epoch 2 (docker stop, as a reboot or `make down-node` does).
        label = f"label=com.docker.compose.project={project.name}-node0"
        container = sh(["docker", "ps", "-q", "--filter", label]).stdout.split()
        assert container, "machine a's node is not running"
        sh(["docker", "stop", *container])
        first_a = a.finish()
        # Machine b's node, its folder never written by rank 0, goes on from the stop.
        b.read_until(r"r0\] resumed from \S+: epoch 1 done, [1-9]\d* samples into the next")
        # The same command brings machine a back: the running service and job are left alone.
        again = Running(up_node(project.root, project, 0, "127.0.0.2"), project.root)
        again_out = again.finish(timeout=600)
        b_out = b.finish(timeout=600)
    finally:
        for process in (a, b):
            if process:
                process.process.kill()
        for node, root in (("0", project.root), ("1", other)):
            sh(["make", "down-node", f"NODE={node}"], cwd=root, check=False)
    # Said as make up says it, a stop, not a failure; and still not 0: the job did not end there.
    assert a.returncode != 0, first_a[-3000:]  # make says 2 for any recipe that fails
    assert "make up-node: the node was stopped (SIGTERM: status 143)" in first_a, first_a[-3000:]
    assert "make up-node: FAILED" not in first_a, first_a[-3000:]
    assert again.returncode == 0, again_out[-3000:]
    assert b.returncode == 0, b_out[-3000:]
    assert "the rendezvous service is running: left alone" in again_out
    assert f"run id {run_id};" in again_out  # the same job
    both = again_out + b_out
    assert "world size 2" in both and "final loss" in both
    # Resumed forwards only: machine b went on from the stop; the round machine a came back to
    # started later still, whichever machine held rank 0 and whichever folder was behind.
    first, *later = resumed_at(b_out)  # rank 0 logs: on either machine once a is back
    later += resumed_at(again_out)
    assert later and min(later) > first, (first, later)
    # Every sample of every epoch once, counting both machines' records together.
    records = [str(root / "logs" / "machines" / "samples") for root in folders.values()]
    package = next(project.root.glob("*/sample_log.py")).parent.name
    report = subprocess.run(
        [sys.executable, "-m", f"{package}.sample_log", *records],
        cwd=project.root,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    assert report.stdout.count("4096 trained, 0 missing, 0 repeated") == 3, report.stdout
    for root in folders.values():
        assert (root / "checkpoints" / "machines" / "ckpt-epoch0003.pt").is_file(), root
        assert (root / "checkpoints" / "machines" / "best.pt").is_file(), root
