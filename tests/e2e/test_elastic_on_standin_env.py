"""A job stopped mid-epoch on 3 nodes and resumed on 2 trains every sample exactly once.

Replaced here: the conda env stage only (the runtime stage is built on the stand-in env image,
see scripts/standin-image.sh).
"""

import re

from helpers import wait_until

# Epochs of several seconds: the stop, sent once epoch 2 has begun, lands inside it.
SAMPLES = 20000
ARGS = f"--epochs 3 --samples {SAMPLES} --batch-size 32 --record-samples"


def test_stopped_on_three_nodes_resumed_on_two_each_sample_once(project):
    folders = "--checkpoint-dir /checkpoints/elastic --log-dir /logs/elastic"
    records = project.root / "logs" / "elastic" / "samples"
    job = project.start_up("NODES=3", f"ARGS={ARGS} {folders}")
    job.read_until(r"epoch 1/3")
    # Mid-epoch 2: its records have begun.
    wait_until(
        lambda: any(f.stat().st_size for f in (records / "epoch0002").glob("*.ids")),
        120,
        "epoch 2 starting",
    )
    project.make("down")
    stopped = job.finish()
    # From rank 0's own log: Compose may stop streaming a container's output before its last
    # lines when `make down` removes it.
    train_log = (project.root / "logs" / "elastic" / "train.log").read_text()
    saved = re.search(
        rf"stop requested: saved \S+ at epoch (\d), sample (\d+) of {SAMPLES}", train_log
    )
    assert saved and 0 < int(saved.group(2)) < SAMPLES, stopped[-3000:] + train_log
    epoch, sample = int(saved.group(1)), saved.group(2)

    resumed = project.make("up", "NODES=2", f"ARGS={ARGS} {folders}").stdout
    assert "world size 2" in resumed
    assert f"epoch {epoch - 1} done, {sample} samples into the next" in resumed
    report = project.make("samples-report", "SAMPLES_DIR=logs/elastic/samples").stdout
    assert report.splitlines() == [
        f"epoch {e}: {SAMPLES} trained, 0 missing, 0 repeated" for e in (1, 2, 3)
    ], report
