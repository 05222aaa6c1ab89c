"""Nodes that stop, leave, join, fail and are killed train every sample exactly once, in
containers.

Replaced here: the conda env stage only (the runtime stage is built on the stand-in env image,
see scripts/standin-image.sh).
"""

import re
import time

from helpers import record, sh, wait_until

# Epochs of several seconds: the stop, sent once epoch 2 has begun, lands inside it.
SAMPLES = 20000
ARGS = f"--epochs 3 --samples {SAMPLES} --batch-size 32 --record-samples"


def wait_for_records(records, epoch):
    """Until the ranks have recorded samples of `epoch` (1-based): a point inside it."""
    wait_until(
        lambda: any(f.stat().st_size for f in (records / f"epoch{epoch:04d}").glob("*.ids")),
        120,
        f"epoch {epoch} starting",
    )


def exactly_once(project, records, epochs=3):
    report = project.make("samples-report", f"SAMPLES_DIR={records}").stdout
    assert report.splitlines() == [
        f"epoch {e}: {SAMPLES} trained, 0 missing, 0 repeated" for e in range(1, epochs + 1)
    ], report


def test_stopped_on_three_nodes_resumed_on_two_each_sample_once(project):
    folders = "--checkpoint-dir /checkpoints/elastic --log-dir /logs/elastic"
    records = project.root / "logs" / "elastic" / "samples"
    job = project.start_up("NODES=3", f"ARGS={ARGS} {folders}")
    job.read_until(r"epoch 1/3")
    wait_for_records(records, epoch=2)
    project.make("down")
    stopped = job.finish()
    # From rank 0's own log: Compose may stop streaming a container's output before its last
    # lines when `make down` removes it.
    train_log = (project.root / "logs" / "elastic" / "train.log").read_text()
    saved = re.search(
        rf"stop requested: saved \S+: epoch (\d) done, (\d+) of {SAMPLES} samples", train_log
    )
    assert saved and 0 < int(saved.group(2)) < SAMPLES, stopped[-3000:] + train_log
    epoch, sample = int(saved.group(1)) + 1, saved.group(2)  # epochs done, as names count

    resumed = project.make("up", "NODES=2", f"ARGS={ARGS} {folders}").stdout
    assert "world size 2" in resumed
    assert f"epoch {epoch - 1} done, {sample} samples into the next" in resumed
    exactly_once(project, "logs/elastic/samples")


def test_the_stopped_node_holding_rank_0_leaves_and_the_job_goes_on_with_each_sample_once(
    project,
):
    folders = "--checkpoint-dir /checkpoints/leave --log-dir /logs/leave"
    job = project.start_up("NODES=3", f"ARGS={ARGS} {folders}")
    wait_for_records(project.root / "logs" / "leave" / "samples", epoch=2)
    leaving = project.holding_rank_0()
    stopped = time.monotonic()
    sh(["docker", "stop", leaving])
    reformed = job.read_until(r"world size 2") - stopped
    out = job.finish()
    assert job.returncode == 0, out[-3000:]
    assert "left the rendezvous" in out
    assert f"{leaving} was stopped (SIGTERM: status 143)" in out
    # Rank 0's duties moved: another node's rank 0 resumed at the saved sample and finished.
    assert re.search(r"resumed from \S+ epoch 1 done, [1-9]\d* samples into the next", out)
    exactly_once(project, "logs/leave/samples")
    record(rank0_node_stopped_to_reformed_s=round(reformed, 1))


def test_scaled_up_and_down_while_running_each_sample_once(project):
    folders = "--checkpoint-dir /checkpoints/scale --log-dir /logs/scale"
    records = project.root / "logs" / "scale" / "samples"
    job = project.start_up("NODES=2", f"ARGS={ARGS} --epochs 5 {folders}")
    wait_for_records(records, epoch=2)
    seconds = {}
    for nodes in (3, 2):
        asked = time.monotonic()
        project.make("scale", f"NODES={nodes}")
        seconds[nodes] = job.read_until(rf"world size {nodes}\b") - asked
    out = job.finish()
    assert job.returncode == 0, out[-3000:]
    exactly_once(project, "logs/scale/samples", epochs=5)
    record(scale_2_to_3_s=round(seconds[3], 1), scale_3_to_2_s=round(seconds[2], 1))


def test_chaos_ends_with_the_job_done_and_every_sample_trained(project):
    """The short version of `make chaos` (4 minutes by default). Seed 2's second kill tends to
    land as a round forms, which ended the job before (a node of the round lost before it
    said its process count). The first stop or kill aims at the node holding rank 0."""
    out = project.make("chaos", "NODES=3", "CHAOS_SECONDS=45", "CHAOS_SEED=2").stdout
    summary = re.search(
        r"chaos: seed 2, \d+ events \((\d+) stop, (\d+) stop rank 0, (\d+) kill, (\d+) kill rank 0,"
        r" (\d+) scale\), make up exited 0; \d+ epochs of \d+ samples: 0 missing, 0 repeated;"
        r" the last checkpoint loads: yes",
        out,
    )
    assert summary, out[-4000:]
    stops, rank0_stops, kills, rank0_kills, scales = map(int, summary.groups())
    assert stops + rank0_stops >= 1 and kills + rank0_kills >= 1 and scales >= 1, summary.group(0)
    assert rank0_stops + rank0_kills >= 1, summary.group(0)
    record(chaos_45s=summary.group(0))


def test_scale_without_a_running_job_says_so(project):
    result = project.make("scale", "NODES=3", check=False)
    assert result.returncode == 2
    assert "ERROR: no job is running here: start one with make up" in result.stderr
