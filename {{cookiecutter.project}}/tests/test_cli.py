"""The training script as a user runs it: arguments, errors, a short run, resume, torchrun."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_dist
from {{ cookiecutter.package }} import checkpoint, distributed

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_2 = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node",
    "2",
    "train_dist.py",
]


def run(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def losses(output):
    return [float(x) for x in re.findall(r"epoch \d+/\d+ loss ([0-9.]+)", output)]


def folders(tmp_path):
    """The job's folders under tmp_path: data (no images: synthetic), checkpoints, logs."""
    return [
        f"--data-dir={tmp_path / 'data'}",
        f"--checkpoint-dir={tmp_path / 'ckpt'}",
        f"--log-dir={tmp_path / 'logs'}",
    ]


def test_defaults():
    args = train_dist.parse_args([])
    assert (args.epochs, args.batch_size, args.lr) == (3, 64, 0.05)
    assert args.backend in ("gloo", "nccl")


def test_arguments_are_parsed():
    args = train_dist.parse_args(
        ["--epochs", "6", "--batch-size", "8", "--lr", "0.1", "--seed", "7"]
    )
    assert (args.epochs, args.batch_size, args.lr, args.seed) == (6, 8, 0.1, 7)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "must be > 0"),
        (["--epochs", "two"], "invalid int value"),
        (["--lr", "-1"], "must be > 0"),
        (["--backend", "mpi"], "invalid choice"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_dist.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_are_reported_by_rank_0_alone(monkeypatch, capsys):
    # Every rank gets the same arguments: one usage per job, not one per process.
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        train_dist.parse_args(["--bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ""


def _train(tmp_path, *extra):
    return run(
        sys.executable,
        "train_dist.py",
        "--samples=256",
        "--batch-size=32",
        *folders(tmp_path),
        *extra,
    )


def test_single_process_trains_checkpoints_and_resumes(tmp_path):
    (tmp_path / "data").mkdir()
    first = _train(tmp_path, "--epochs", "2")
    assert first.returncode == 0, first.stderr
    assert len(losses(first.stdout)) == 2
    assert "final loss" in first.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == [
        "best.pt",
        "ckpt-epoch0001.pt",
        "ckpt-epoch0002.pt",
    ]
    assert "final loss" in (tmp_path / "logs" / "train.log").read_text()
    assert re.search(r"^\d\d:\d\d:\d\d \[\S+ r0\] epoch 1/2 loss", first.stdout, re.MULTILINE)
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"loss", "accuracy", "samples_per_s", "val_loss", "val_accuracy"} <= set(metrics[0])
    # best.pt is the epoch with the best validation accuracy so far.
    best = torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)
    top = max(metrics, key=lambda m: m["val_accuracy"])
    assert best["best"] == top["val_accuracy"] and best["epoch"] == top["epoch"]
    assert list((tmp_path / "logs" / "tb").glob("events.out.tfevents.*"))

    again = _train(tmp_path, "--epochs", "3")
    assert again.returncode == 0, again.stderr
    assert "epoch 2 done" in again.stdout
    assert re.findall(r"epoch (\d+)/3", again.stdout) == ["3"]


def _mid_epoch_checkpoint(tmp_path):
    """A run of 256 samples that saved 192 samples into its 2nd epoch, its newest checkpoint."""
    first = _train(tmp_path, "--epochs", "2", "--save-every-steps", "3")  # 8 steps an epoch
    assert first.returncode == 0, first.stderr
    (tmp_path / "ckpt" / "ckpt-epoch0002.pt").unlink()  # as if stopped halfway into epoch 2
    newest = checkpoint.checkpoints(tmp_path / "ckpt")[-1]
    assert newest.name == "ckpt-epoch0001-sample00000192.pt"
    return newest


def test_a_resume_with_another_seed_is_refused_in_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    newest = _mid_epoch_checkpoint(tmp_path)
    result = _train(tmp_path, "--epochs", "2", "--seed", "1")
    assert result.returncode == 2
    said = f"ERROR: {newest} was trained with --seed 0: resume with it, or start afresh "
    said += "(make fresh-start)\n"
    assert result.stderr == said


def test_a_changed_training_set_is_refused_mid_epoch_and_taken_at_an_epoch_end(tmp_path):
    (tmp_path / "data").mkdir()
    newest = _mid_epoch_checkpoint(tmp_path)
    refused = _train(tmp_path, "--epochs", "2", "--samples", "320")
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        f"ERROR: {newest} was trained on 256 samples an epoch; there are 320: it stopped mid-epoch"
    )
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    same = _train(tmp_path, "--epochs", "2")  # the same set finishes the epoch
    assert same.returncode == 0, same.stderr
    assert "epoch 1 done, 192 samples into the next" in same.stdout
    grown = _train(tmp_path, "--epochs", "3", "--samples", "320")  # from the end of epoch 2
    assert grown.returncode == 0, grown.stderr
    assert "on 256 samples an epoch; there are 320: the next epoch deals the new" in grown.stdout
    assert re.findall(r"epoch (\d+)/3", grown.stdout) == ["3"]


def test_without_a_terminal_rank_0_logs_progress_every_few_seconds(tmp_path):
    (tmp_path / "data").mkdir()
    # Every microsecond: a line after (nearly) every step, however fast the machine.
    result = _train(tmp_path, "--epochs", "2", "--batch-size", "8", "--progress-every", "1e-6")
    assert result.returncode == 0, result.stderr
    shown = re.findall(
        r"epoch (\d)/2 step (\d+)/32, \d+ samples/s, ETA epoch (\d+:\d\d), job (\d+:\d\d)$",
        result.stdout,
        re.MULTILINE,
    )
    assert {epoch for epoch, *_ in shown} == {"1", "2"}, result.stdout
    steps = [int(step) for epoch, step, *_ in shown if epoch == "1"]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert "it/s" not in result.stdout + result.stderr  # no bar without a terminal


def test_progress_lines_count_steps_from_a_resume_and_estimate_what_is_left(monkeypatch, caplog):
    from {{ cookiecutter.package }} import logs
    from {{ cookiecutter.package }}.dealing import EpochBatches

    ticks = iter(range(100))  # each read of the clock: one second later
    monkeypatch.setattr(logs.time, "monotonic", lambda: float(next(ticks)))
    batches = EpochBatches(640, batch_size=16, rank=0, world_size=2, seed=0)  # 20 steps
    batches.set_epoch(1, consumed=320)  # resumed halfway into the 2nd of 3 epochs
    with caplog.at_level("INFO", logger=logs.__name__):
        assert list(logs.logged_progress(range(10), batches, 1, 3, every=2)) == list(range(10))
    lines = [record.getMessage() for record in caplog.records]
    # Step 2 of this start comes 2 s after its start: 1 step/s, 32 samples/s; 8 steps of this
    # epoch left, and the 20 of the last.
    assert lines[0] == "epoch 2/3 step 12/20, 32 samples/s, ETA epoch 0:08, job 0:28"
    assert len(lines) == 5 and lines[-1].startswith("epoch 2/3 step 20/20, ")


def test_missing_data_dir_is_one_line_not_a_traceback(tmp_path):
    result = _train(tmp_path, "--epochs", "1")
    assert result.returncode == 2
    assert "ERROR: data directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_checkpoint_dir_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    real_access = os.access
    blocked = str(tmp_path / "ckpt")
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == blocked else real_access(p, m)
    )
    args = ["--epochs=1", "--samples=64", *folders(tmp_path), f"--checkpoint-dir={blocked}"]
    assert train_dist.main(args) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"ERROR: {blocked}") and said.count("\n") == 1, said
    assert "Traceback" not in said


def test_validation_counts_every_sample_once_over_the_ranks(tmp_path):
    # 7 validation samples over 3 ranks (3, 2, 2), at epoch ends and every 2 steps.
    (tmp_path / "data").mkdir()
    torchrun_3 = [*TORCHRUN_2[:-2], "3", "train_dist.py"]
    job = ["--task=tests/probe_task.py", "--points=60", "--batch-size=4", "--epochs=2"]
    result = run(*torchrun_3, *job, "--val-every-steps=2", *folders(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").open()]
    validated = [row for row in rows if "val_mse" in row]
    # 60 samples, 12 a step: 5 steps an epoch, validated after steps 2 and 4 and at the end.
    assert [row["epoch"] for row in validated] == [0.4, 0.8, 1, 1.4, 1.8, 2]
    assert {(row["val_count"], row["val_keys"]) for row in validated} == {(7, 2**7 - 1)}
    assert re.search(r"epoch 0\.400/2 val_loss [0-9.]+ .*val_count 7\.0000$", result.stdout, re.M)
    assert re.search(r"epoch 2/2 loss [0-9.]+ .* val_mse [0-9.]+", result.stdout)
    best = torch.load(tmp_path / "ckpt" / "best.pt", weights_only=True)
    assert best["best"] == min(row["val_mse"] for row in validated)


def test_a_checkpoint_the_safe_loader_refuses_stops_with_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "ckpt").mkdir()
    # What a fork gets when its state holds an object of its own (here a pathlib.Path).
    state = {"model": {}, "epoch": 1, "extra": Path("x")}
    torch.save(state, tmp_path / "ckpt" / "ckpt-epoch0001.pt")
    result = _train(tmp_path, "--epochs", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ERROR: ") and "ckpt-epoch0001.pt" in line and "add_safe_globals" in line
    assert (tmp_path / "ckpt" / "ckpt-epoch0001.pt").exists()  # not set aside, not replaced


@pytest.mark.parametrize(
    "task, message",
    [
        ("nowhere.py", "TASK nowhere.py: no such file"),
        ("tests/nodes.py", "defines no datasets, model, optimizer, step"),
    ],
)
def test_a_task_that_cannot_be_used_stops_with_one_line(tmp_path, task, message):
    (tmp_path / "data").mkdir()
    result = _train(tmp_path, "--epochs", "1", f"--task={task}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ERROR: ") and message in line


def test_a_task_that_does_not_import_shows_its_traceback_and_is_not_retried(tmp_path):
    (tmp_path / "data").mkdir()
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise ValueError('my bug')\n")
    result = _train(tmp_path, "--epochs", "1", f"--task={broken}")
    assert result.returncode == 2  # a restart cannot fix it
    assert "Traceback" in result.stderr and "ValueError: my bug" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"ERROR: TASK {broken} does not import: my bug"


def test_compile_trains_or_says_what_it_lacks(tmp_path):
    (tmp_path / "data").mkdir()
    result = _train(tmp_path, "--epochs=1", "--samples=128", "--compile")
    if shutil.which(os.environ.get("CXX", "g++")):
        assert result.returncode == 0, result.stderr[-3000:]
        assert "final loss" in result.stdout
    else:  # an image without a compiler: one line, no traceback, not retried
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip() == (
            "ERROR: --compile on CPUs needs a C++ compiler (g++, or CXX): add one or leave it out"
        )


def test_fp16_trains_and_its_checkpoint_keeps_the_scaler(tmp_path):
    (tmp_path / "data").mkdir()
    result = _train(tmp_path, "--epochs=1", "--precision=fp16", "--accum-steps=2")
    assert result.returncode == 0, result.stderr
    saved = torch.load(tmp_path / "ckpt" / "ckpt-epoch0001.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 1


# Rank 0's checkpoint reads and writes, 6 s each: loaded into every process of the job.
SLOW_DISK = """
import time
from {{ cookiecutter.package }} import checkpoint

def slowly(call):
    def slow(*args, **kwargs):
        time.sleep(6)
        return call(*args, **kwargs)
    return slow

checkpoint.load_latest, checkpoint.write = slowly(checkpoint.load_latest), slowly(checkpoint.write)
"""


def test_a_checkpoint_slower_to_read_and_write_than_the_step_timeout_is_waited_for(tmp_path):
    # --timeout 3 bounds a training step's collectives; rank 0 takes 6 s for each read and write.
    (tmp_path / "data").mkdir()
    job = ["--samples=256", "--batch-size=32", "--save-every-steps=0", *folders(tmp_path)]
    first = run(*TORCHRUN_2, "--epochs=1", *job)
    assert first.returncode == 0, first.stderr
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_DISK)
    slow = os.pathsep.join([str(tmp_path / "slow"), str(ROOT)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": slow}
    env.pop("RANK", None)
    second = subprocess.run(
        [*TORCHRUN_2, "--epochs=2", "--timeout=3", *job],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "epoch 2/2" in second.stdout


def test_torchrun_two_processes_loss_decreases(tmp_path):
    (tmp_path / "data").mkdir()
    result = run(*TORCHRUN_2, "--epochs=3", "--samples=512", "--batch-size=32", *folders(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "world size 2" in result.stdout
    found = losses(result.stdout)
    assert len(found) == 3, result.stdout
    assert found[-1] < found[0]
    # Both ranks report the same weights (the script fails if they differ).
    assert re.search(r"weights by rank: 0@\S+=(\w+) 1@\S+=\1$", result.stdout, re.MULTILINE)


def _start(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.Popen(
        [*args, "--samples=4096", "--batch-size=16", "--epochs=50", *folders(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stop_after_first_epoch(process):
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "epoch 1/50" in line:
            # Into a later epoch, so the checkpoint is most likely a mid-epoch one (which epoch
            # depends on the machine: a GPU may finish the next one within the sleep).
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            break
    out, _ = process.communicate(timeout=120)
    return "".join(lines) + out


def test_sigterm_saves_where_it_stopped_and_the_next_run_resumes(tmp_path):
    (tmp_path / "data").mkdir()
    out = _stop_after_first_epoch(_start(tmp_path, sys.executable, "train_dist.py"))
    stopped = re.search(
        r"stop requested: saved \S+/(ckpt-epoch(\d{4})(-sample(\d+))?\.pt): epoch (\d+) done, "
        r"(\d+) of 4096 samples into the next",
        out,
    )
    assert stopped, out
    name, done, samples = stopped.group(1), int(stopped.group(2)), int(stopped.group(4) or 0)
    # The log line counts as the checkpoint's name does: epochs done, samples into the next.
    assert (int(stopped.group(5)), int(stopped.group(6))) == (done, samples)
    epoch = done + 1
    assert epoch >= 2
    assert (tmp_path / "ckpt" / name).exists()

    again = _train(tmp_path, "--epochs", str(epoch), "--samples", "4096", "--batch-size", "16")
    assert again.returncode == 0, again.stderr
    assert f"epoch {done} done, {samples} samples into the next" in again.stdout
    assert re.findall(rf"epoch (\d+)/{epoch}", again.stdout) == [str(epoch)]


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    (tmp_path / "data").mkdir()
    process = _start(tmp_path, *TORCHRUN_2, "--record-samples")
    out = _stop_after_first_epoch(process)
    assert process.returncode != 0
    saved = r"stop requested: saved \S+/ckpt-epoch\d{4}(-sample\d+)?\.pt: epoch (\d+) done"
    stopped = re.search(saved, out)
    assert stopped, out
    # No rank's traceback; plain torchrun reports the signal it got with one of its own.
    assert "Traceback" not in out.split("stop requested")[0]
    assert "train_dist.py" not in out.split("stop requested")[1], out
    # Each rank recorded the samples it trained. Had one stopped a step after the others, the
    # resume (which starts where rank 0 saved) would train that step's samples again; a step
    # before, never.
    epoch = int(stopped.group(2)) + 1
    again = run(
        *TORCHRUN_2,
        f"--epochs={epoch}",
        "--samples=4096",
        "--batch-size=16",
        "--record-samples",
        *folders(tmp_path),
    )
    assert again.returncode == 0, again.stderr
    samples = tmp_path / "logs" / "samples"
    report = run(sys.executable, "-m", "{{ cookiecutter.package }}.sample_log", str(samples))
    assert report.returncode == 0, report.stdout + report.stderr
    assert report.stdout.count("4096 trained, 0 missing, 0 repeated") == epoch, report.stdout


def test_backend_follows_ddp_backend_then_the_gpus_per_process(monkeypatch):
    monkeypatch.setenv("DDP_BACKEND", "nccl")
    assert train_dist.parse_args([]).backend == "nccl"
    monkeypatch.delenv("DDP_BACKEND")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_dist.parse_args([]).backend == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert train_dist.parse_args([]).backend == "nccl"
    # Two processes on a one-GPU host (make train-local): nccl would refuse to start.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train_dist.parse_args([]).backend == "gloo"


def test_each_rank_gets_its_own_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed.pick_device("gloo", 3).type == "cpu"
    devices = [distributed.pick_device("nccl", rank).index for rank in range(6)]
    assert devices == [0, 1, 2, 3, 0, 1]
    assert len(chosen) == 6


# Rank 0's checkpoint writes take 3 s: loaded into every process of the job.
SLOW_WRITES = """
import time
from {{ cookiecutter.package }} import checkpoint

write = checkpoint.write

def slow_write(*args, **kwargs):
    time.sleep(3)
    return write(*args, **kwargs)

checkpoint.write = slow_write
"""


@pytest.mark.parametrize(
    "when, seen",
    [("in a training step", "epoch 2/50 step"), ("while rank 0 saves", "epoch 1/50 loss")],
)
def test_a_peer_that_hangs_fails_the_job_after_the_step_timeout(tmp_path, when, seen):
    """A rank stopped with SIGSTOP answers nothing and raises nothing: its peer's next collective
    fails after --timeout (5 s here; torch's own default is 30 minutes) and the job ends. Also
    when it hangs while it waits for rank 0's save (rank 0 logs an epoch's line, then writes
    best.pt for 3 s): the others wait for a save under --checkpoint-timeout (900 s here), but
    rank 0, once it has written, waits for them under --timeout."""
    (tmp_path / "data").mkdir()
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_WRITES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "slow"), str(ROOT)])
    env.pop("RANK", None)
    process = subprocess.Popen(
        [*TORCHRUN_2, "--timeout=5", "--checkpoint-timeout=900", "--progress-every=0.2"]
        + ["--samples=4096", "--batch-size=16", "--epochs=50", *folders(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if seen in line:
            break
    workers = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGSTOP)
    try:
        # torchrun then gives the stopped rank 30 s to answer its SIGTERM, and kills it.
        out, _ = process.communicate(timeout=240)
    finally:
        for pid in workers:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = "".join(lines) + out
    assert process.returncode != 0
    assert re.search(r"[Tt]imed out", out), out[-3000:]
