"""Stops, leaves, joins and world-size changes train every sample of every epoch exactly once, and
a job stopped and resumed at the same world size ends with the uninterrupted run's weights."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import example_data
import nodes
import pytest
from nodes import Node, free_port

from {{ cookiecutter.package }} import checkpoint, sample_log

ROOT = Path(__file__).resolve().parents[1]
# Small batches, so that an epoch takes seconds: a stop sent early in one lands inside it.
SAMPLES, BATCH = 4000, 8
JOB = ["--epochs=3", f"--batch-size={BATCH}", "--record-samples"]
# Seconds from a node's stop, kill or loss to the job's training again on the others: about
# three times what these tests measured (2026-12-03, 2 CPUs shared by every node: 3.3, 5.6, 5.0
# and 5.8 s; the figures of record are the bench's), so that a recovery much slower fails.
RECOVERY_S = {"leave": 10, "kill": 17, "lost as its round forms": 15, "spare": 18}


def recovered(what, since, when):
    """Assert that the recovery `what`, from `since` to the line at `when`, kept its bound."""
    took = when - since
    print(f"recovery from {what}: {took:.1f} s (bound {RECOVERY_S[what]} s)")
    assert took < RECOVERY_S[what], f"recovery from {what} took {took:.1f} s"


def torchrun(tmp_path, processes, *extra):
    """The job under torchrun, in the background (its own process group), with its folders
    under tmp_path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    folders = [f"--{name}-dir={tmp_path / name}" for name in ("data", "checkpoint", "log")]
    if not any(arg.startswith("--task=") for arg in extra):
        extra = (f"--samples={SAMPLES}", *extra)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + [f"--nproc-per-node={processes}", "train_dist.py", *JOB, *folders, *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_records(job, tmp_path, epoch, lines=1):
    """Until the ranks have recorded `lines` samples of `epoch` (1-based)."""
    records = tmp_path / "log" / "samples" / f"epoch{epoch:04d}"
    deadline = time.monotonic() + 120
    while sum(f.read_text().count("\n") for f in records.glob("*.ids")) < lines:
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
        time.sleep(0.01)


def stop_in_epoch(job, tmp_path, epoch):
    """SIGTERM to the job once its ranks have trained a step of `epoch`: a stop mid-epoch."""
    wait_for_records(job, tmp_path, epoch)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=120)
    saved = re.search(r"stop requested: saved \S+: epoch (\d+) done, (\d+) of \d+ samples", out)
    assert saved and saved.group(1) == str(epoch - 1) and int(saved.group(2)) > 0, out
    return out


def finish(job):
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    return out


def fingerprint(out):
    return re.search(r"weights by rank: 0@\S+=(\w+)", out).group(1)


def example(tmp_path, name):
    """The arguments that train the task `name` on small data made under tmp_path/data."""
    data = tmp_path / "data"
    data.mkdir()
    if name == "resnet18":
        example_data.images(data / "train", per_class=40)
        # 64: at 32 the last BatchNorm sees 1x1 maps, and a step of one sample cannot train.
        return ["--task=examples/resnet18.py", "--image-size=64"]
    if name == "charlm":
        text = example_data.text(data / "text.txt")
        shape = ["--block-size=16", "--stride=4", "--width=32", "--layers=1"]
        return ["--task=examples/charlm.py", f"--text={text}", *shape]
    return []


# ResNet-18 on 2 ranks, then 1: three of them overflow the 2 GB of a default node (make test).
@pytest.mark.parametrize("task, ranks", [("default", 3), ("resnet18", 2), ("charlm", 3)])
def test_ranks_stopped_mid_epoch_resume_as_fewer_and_train_each_sample_once(tmp_path, task, ranks):
    args = example(tmp_path, task)
    stop_in_epoch(torchrun(tmp_path, ranks, *args), tmp_path, epoch=2)
    out = finish(torchrun(tmp_path, ranks - 1, *args))
    assert f"world size {ranks - 1}" in out
    assert re.search(r"epoch 1 done, \d+ samples into the next", out)
    assert re.search(r"epoch 3/3 loss [0-9.]+ .*val_loss [0-9.]+", out)
    counted = sample_log.count(tmp_path / "log" / "samples")
    size = counted[0][1] + counted[0][2]
    assert counted == [(epoch, size, 0, 0) for epoch in (1, 2, 3)]


# What a resume must carry on exactly: the schedule's place, the accumulated step, clipping.
LOOP = ["--schedule=cosine", "--warmup-ratio=0.1", "--accum-steps=2", "--clip-grad-norm=1.0"]


def test_stops_at_the_same_world_size_end_with_the_uninterrupted_weights(tmp_path):
    for run in ("whole", "stopped"):
        (tmp_path / run / "data").mkdir(parents=True)
    whole = finish(torchrun(tmp_path / "whole", 2, *LOOP))
    stop_in_epoch(torchrun(tmp_path / "stopped", 2, *LOOP), tmp_path / "stopped", epoch=1)
    stop_in_epoch(torchrun(tmp_path / "stopped", 2, *LOOP), tmp_path / "stopped", epoch=2)
    resumed = finish(torchrun(tmp_path / "stopped", 2, *LOOP))
    assert fingerprint(resumed) == fingerprint(whole)
    assert [row[1:] for row in sample_log.count(tmp_path / "stopped" / "log" / "samples")] == [
        (SAMPLES, 0, 0)
    ] * 3


def test_a_kill_repeats_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    every, ranks = 5, 2
    job = torchrun(tmp_path, ranks, f"--save-every-steps={every}")
    wait_for_records(job, tmp_path, epoch=2, lines=1000)
    os.killpg(job.pid, signal.SIGKILL)  # the agent and its ranks: no stop, no save
    job.communicate(timeout=60)
    finish(torchrun(tmp_path, ranks, f"--save-every-steps={every}"))
    counted = sample_log.count(tmp_path / "log" / "samples")
    assert [row[:3] for row in counted] == [(e, SAMPLES, 0) for e in (1, 2, 3)]  # none missing
    assert counted[0][3] == counted[2][3] == 0
    assert 0 <= counted[1][3] <= every * BATCH * ranks, counted  # repeated: at most 5 steps


def start_nodes(tmp_path, count, **env):
    """The rendezvous service and `count` nodes of one job on this machine, each started as in
    a container (python -m launcher.rendezvous, python -m launcher); returns (service, nodes)."""
    common = job_environment(tmp_path, **env)
    return nodes.rendezvous(**common), [Node(**common) for _ in range(count)]


def job_environment(tmp_path, **env):
    (tmp_path / "data").mkdir(exist_ok=True)
    folders = " ".join(f"--{name}-dir={tmp_path / name}" for name in ("data", "checkpoint", "log"))
    return {
        "SCRIPT": "train_dist.py",
        "ARGS": " ".join(JOB) + f" --samples={SAMPLES} " + folders,
        "RDZV_ADDR": "127.0.0.1",
        "RDZV_PORT": str(free_port()),
        "NPROC_PER_NODE": "1",
        "START_METHOD": "fork",
        "OMP_NUM_THREADS": "1",
        "RUN_ID": f"elastic-{os.getpid()}",
        **env,
    }


def first_line(started, pattern, after):
    """The time of the first line matching `pattern`, after `after`, on any of the nodes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        times = [
            when
            for node in started
            for when, line in list(node.lines)
            if when >= after and re.search(pattern, line)
        ]
        if times:
            return min(times)
        time.sleep(0.05)
    raise AssertionError(f"never saw {pattern!r}:\n{started[0].output[-3000:]}")


def holding_rank_0(started, size):
    """The node whose rank 0 started the round of `size` nodes, and the others."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for node in started:
            if re.search(rf"r0\] world size {size}\b", node.output):
                return node, [other for other in started if other is not node]
        time.sleep(0.05)
    raise AssertionError(f"no node started a round of {size}:\n{started[0].output}")


def test_the_node_holding_rank_0_stopped_mid_epoch_leaves_and_the_rest_go_on_with_each_sample_once(
    tmp_path,
):
    # MAX_RESTARTS=0: a leave is no failure, so it needs no restart. Two nodes, so that the
    # suite fits one 2 GB container (make test).
    service, started = start_nodes(tmp_path, 2, NODES="2", MAX_RESTARTS="0")
    leaving, staying = holding_rank_0(started, 2)
    wait_for_records(leaving.process, tmp_path, epoch=2)
    stopped = time.monotonic()
    leaving.process.send_signal(signal.SIGTERM)
    new_rank_0, _ = holding_rank_0(staying, 1)  # rank 0's duties moved to the node that stayed
    assert leaving.finish() == 143, leaving.output  # stopped, not failed
    assert "left the rendezvous" in leaving.output
    assert re.search(r"r0\] stop requested: saved", leaving.output), leaving.output
    back = r"r0\] resumed from \S+ epoch 1 done, [1-9]\d* samples into the next"
    recovered("leave", stopped, new_rank_0.wait_for(back))
    for node in staying:
        assert node.finish() == 0, node.output
        # Its ranks stopped with the leaver's: a membership change, not a failure.
        assert "the job re-forms, no restart counted" in node.output
    assert "final loss" in new_rank_0.output
    assert service.finish(timeout=120) == 0, service.output
    assert sample_log.count(tmp_path / "log" / "samples") == [(e, SAMPLES, 0, 0) for e in (1, 2, 3)]


def test_the_node_holding_rank_0_killed_mid_epoch_costs_no_sample(tmp_path):
    """No save since the epoch began: the node that stays saves the last step its rank finished
    before its ranks exit (checkpoint.Saver.rescue), and the next round goes on from there, so
    nothing is trained twice and nothing is lost."""
    service, started = start_nodes(tmp_path, 2, NODES="2")
    killed, staying = holding_rank_0(started, 2)
    wait_for_records(killed.process, tmp_path, epoch=2, lines=500)
    lost = time.monotonic()
    nodes.kill(killed.process)  # the launcher and its ranks: no stop, no save, no leave
    new_rank_0, _ = holding_rank_0(staying, 1)
    resumed = new_rank_0.wait_for(r"r0\] resumed from \S+-sample\d+\.pt: epoch 1 done", after=lost)
    recovered("kill", lost, resumed)
    for node in staying:
        assert node.finish() == 0, node.output
    assert "final loss" in new_rank_0.output
    saved = r"training failed: saved its last finished step, \S+: epoch 1 done, [1-9]\d* of"
    assert re.search(saved, staying[0].output), staying[0].output
    assert service.finish(timeout=120) == 0, service.output
    assert sample_log.count(tmp_path / "log" / "samples") == [(e, SAMPLES, 0, 0) for e in (1, 2, 3)]


def start_machines(tmp_path, names, **env):
    """The rendezvous service and a node for each name, as on machines that share no disk
    (make up-node on each): each node has its own checkpoint and log folders under
    tmp_path/<name>; node.home is that folder."""
    common = job_environment(tmp_path, **env)
    return nodes.rendezvous(**common), [machine(tmp_path, name, common) for name in names]


def machine(tmp_path, name, environment):
    home = tmp_path / name
    folders = f"--data-dir={tmp_path / 'data'} --checkpoint-dir={home / 'checkpoint'} "
    args = " ".join(JOB) + f" --samples={SAMPLES} {folders} --log-dir={home / 'log'}"
    node = Node(**{**environment, "ARGS": args})
    node.home = home
    return node


def resumed_at(out):
    return [(int(e), int(s)) for e, s in re.findall(r"epoch (\d+) done, (\d+) samples into", out)]


def test_rank_0_moving_between_machines_without_a_shared_disk_loses_nothing_and_never_goes_back(
    tmp_path,
):
    service, started = start_machines(tmp_path, ["a", "b"], NODES="2", MIN_NODES="1")
    leaving, (staying,) = holding_rank_0(started, 2)
    wait_for_records(leaving.process, leaving.home, epoch=2)
    leaving.process.send_signal(signal.SIGTERM)
    assert leaving.finish() == 143, leaving.output
    # The node left on the other machine, its folder never written by rank 0, goes on from
    # where the stop left off, not from the start.
    staying.wait_for(r"r0\] resumed from \S+ epoch 1 done, [1-9]\d* samples into the next")
    back = machine(tmp_path, leaving.home.name, leaving.environment)  # its folder is behind now
    holding_rank_0([staying, back], 2)
    for node in (staying, back):
        assert node.finish() == 0, node.output
    assert service.finish(timeout=120) == 0, service.output
    # Resumed only forwards, whichever machine held rank 0 and whichever folder was behind.
    first, *later = resumed_at(staying.output)
    later += resumed_at(back.output)
    assert later and min(later) > first, (first, later)
    logs = [tmp_path / name / "log" / "samples" for name in ("a", "b")]
    assert sample_log.count(*logs) == [(e, SAMPLES, 0, 0) for e in (1, 2, 3)]
    # The machine that came back stored the checkpoint its round resumed from: it does not
    # depend on the other machine staying up until the next save.
    last_start = re.findall(r"resumed from \S+/(ckpt-\S+\.pt)", staying.output + back.output)[-1]
    for name in ("a", "b"):
        assert (tmp_path / name / "checkpoint" / last_start).is_file(), name
    # Each machine's own folder holds the job's last checkpoint and best.pt, the same content.
    last = [(tmp_path / name / "checkpoint" / "ckpt-epoch0003.pt") for name in ("a", "b")]
    assert checkpoint.content_hash(last[0].read_bytes()) == checkpoint.content_hash(
        last[1].read_bytes()
    )
    assert all((path.parent / "best.pt").is_file() for path in last)


def test_a_lost_rendezvous_service_stops_every_node_with_one_line_after_a_save(tmp_path):
    service, started = start_nodes(tmp_path, 2, NODES="2")
    rank_0, _ = holding_rank_0(started, 2)
    wait_for_records(rank_0.process, tmp_path, epoch=2)
    nodes.kill(service.process)
    lost = "ERROR: lost the rendezvous service 127.0.0.1:"
    for node in started:
        assert node.finish() == 1, node.output
        assert node.output.count(lost) == 1, node.output
        for trace in ("Traceback", "frame #"):
            assert trace not in node.output, node.output
    # Its ranks were stopped, and rank 0 saved where they stopped: a next start loses nothing.
    assert re.search(r"r0\] stop requested: saved \S+: epoch 1 done", rank_0.output), rank_0.output


def test_a_node_that_joins_a_running_job_is_taken_in_and_each_sample_trained_once(tmp_path):
    service, first = start_nodes(tmp_path, 1, NODES="1", MAX_NODES="2")
    wait_for_records(first[0].process, tmp_path, epoch=2)
    # Started as `make scale` starts it: the settings of the running job, NODES included.
    joining = Node(**first[0].environment)
    holding_rank_0([*first, joining], 2)
    for node in (*first, joining):
        assert node.finish() == 0, node.output
    assert sample_log.count(tmp_path / "log" / "samples") == [(e, SAMPLES, 0, 0) for e in (1, 2, 3)]


def test_a_node_beyond_max_nodes_waits_as_a_spare_and_takes_a_killed_members_place(tmp_path):
    service, started = start_nodes(tmp_path, 3, NODES="3", MAX_NODES="2")
    spare_line = "this node waits as a spare"
    deadline = time.monotonic() + 120
    while not any(spare_line in node.output for node in started):
        assert time.monotonic() < deadline, "".join(node.output for node in started)
        time.sleep(0.05)
    spare = next(node for node in started if spare_line in node.output)
    members = [node for node in started if node is not spare]
    killed, (staying,) = holding_rank_0(members, 2)
    wait_for_records(killed.process, tmp_path, epoch=2, lines=100)
    lost = time.monotonic()
    nodes.kill(killed.process)
    # Restarted at once, as Docker restarts a killed container: three nodes for two places
    # again, while the round re-forms.
    restarted = Node(**killed.environment)
    recovered("spare", lost, first_line((staying, spare, restarted), r"r0\] resumed from ", lost))
    for node in (staying, spare, restarted):
        assert node.finish() == 0, node.output
    assert service.finish(timeout=120) == 0, service.output
    everyone = (*started, restarted)
    rounds = re.findall(r"r0\] world size (\d+)", "".join(n.output for n in everyone))
    # A place for the spare or the restarted node (rounds of 2, never 1), and no round formed
    # for nothing: the first, one or two after the kill, not one after another.
    assert set(rounds) == {"2"} and len(rounds) <= 3, rounds
    counted = sample_log.count(tmp_path / "log" / "samples")
    assert [row[:3] for row in counted] == [(e, SAMPLES, 0) for e in (1, 2, 3)]  # none missing


def test_a_node_lost_as_its_round_forms_costs_a_round_not_the_job(tmp_path):
    # RDZV_TIMEOUT far above the 3 s of silence after which a node is dropped.
    service, started = start_nodes(tmp_path, 2, NODES="3", RDZV_TIMEOUT="100")
    # Its address sorts last: it is not rank 0, whose own keys come before the exchange.
    lost = nodes.ghost(started[0].environment, "~lost")
    assert lost.wait(timeout=120) == 0  # it was in the first round when it died
    died = time.monotonic()
    # The others waited for its process count until it was dropped, not for RDZV_TIMEOUT, and
    # formed a round without it; before, their agents ended there, and the job with them.
    rank_0, _ = holding_rank_0(started, 2)
    recovered("lost as its round forms", died, rank_0.wait_for(r"r0\] world size 2\b"))
    assert "a node of the new round is gone: forming another" in "".join(
        node.output for node in started
    )
    for node in started:
        assert node.finish() == 0, node.output
    assert "final loss" in rank_0.output
    assert sample_log.count(tmp_path / "log" / "samples") == [(e, SAMPLES, 0, 0) for e in (1, 2, 3)]


def test_the_report_says_what_is_missing_or_repeated(tmp_path, capsys):
    epoch = tmp_path / "epoch0001"
    epoch.mkdir()
    (epoch / "size").write_text("4\n")
    (epoch / "a-1-r0.ids").write_text("0\n1\n")
    (epoch / "b-2-r0.ids").write_text("1\n2\n")
    assert sample_log.main([str(tmp_path)]) == 1
    assert capsys.readouterr().out == "epoch 1: 3 trained, 1 missing, 1 repeated\n"
    (epoch / "c-3-r1.ids").write_text("3\n")
    assert sample_log.main(["--at-least-once", str(tmp_path)]) == 0
    (epoch / "b-2-r0.ids").write_text("2\n")
    assert sample_log.main([str(tmp_path)]) == 0


def test_the_report_counts_a_sample_once_a_round_and_again_in_another(tmp_path, capsys):
    """A failed round's saved step is recorded by the rank that saved it, every rank's ids, and by
    the ranks that finished it themselves: once, in that round. A sample trained in two rounds
    (a resume from an older save) is repeated."""
    epoch = tmp_path / "epoch0001"
    epoch.mkdir()
    (epoch / "size").write_text("4\n")
    (epoch / f"round{1:016x}-a-1-r0.ids").write_text("0\n1\n")
    (epoch / f"round{1:016x}-b-2-r1.ids").write_text("2\n")
    (epoch / f"round{1:016x}-a-1-rescued.ids").write_text("0\n1\n2\n3\n")
    assert sample_log.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == "epoch 1: 4 trained, 0 missing, 0 repeated\n"
    (epoch / f"round{2:016x}-b-3-r0.ids").write_text("3\n")
    assert sample_log.main([str(tmp_path)]) == 1
    assert capsys.readouterr().out == "epoch 1: 4 trained, 0 missing, 1 repeated\n"
