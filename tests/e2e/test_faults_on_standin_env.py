"""Faults and bad input with real containers: the job recovers or fails fast, and loses nothing.

Replaced here: the conda env stage only (the runtime stage is built on the stand-in env image,
see scripts/standin-image.sh). Times are recorded in build/e2e-timings.json, not asserted.
"""

import re
import time

from helpers import record, sh

CRASHING_SCRIPT = 'import sys\nprint("crashing on purpose", flush=True)\nsys.exit(3)\n'


def epochs_logged(text):
    return [int(n) for n in re.findall(r"epoch (\d+)/\d+ loss", text)]


def test_killed_node_holding_rank_0_job_reforms_resumes_and_finishes_each_sample_once(project):
    """No periodic save: the nodes left save the last step they finished before they re-form
    (the e2e check of issue 36's promise: a kill trains no sample twice)."""
    folders = "--checkpoint-dir /checkpoints/kill --log-dir /logs/kill --record-samples"
    job, killed, name = project.kill_during_training(
        None, "NODES=3", f"ARGS=--epochs 6 --samples 4096 {folders}", epoch=2
    )
    resumed = job.read_until(r"resumed from \S+: epoch \d+ done")
    out = job.finish()
    assert job.returncode == 0, out[-3000:]
    resumed_at = int(re.search(r"resumed from \S+: epoch (\d+) done", out).group(1))
    assert resumed_at >= 2
    assert sorted(set(epochs_logged(out))) == [1, 2, 3, 4, 5, 6]
    assert re.findall(r"world size (\d+)", out)[-1] == "2"
    assert f"{name} was killed (status 137)" in out
    assert (project.root / "build" / "status").read_text() == "0\n"
    report = project.make("samples-report", "SAMPLES_DIR=logs/kill/samples").stdout
    assert report.splitlines() == [
        f"epoch {e}: 4096 trained, 0 missing, 0 repeated" for e in range(1, 7)
    ], report
    record(rank0_node_killed_to_resumed_s=round(resumed - killed, 1))


def test_a_killed_rendezvous_service_stops_every_node_with_one_line_and_up_resumes(project):
    args = "ARGS=--epochs 50 --samples 4096 --checkpoint-dir /checkpoints/kill-rendezvous"
    job, _, _ = project.kill_during_training("rendezvous-1", "NODES=2", args, epoch=2)
    out = job.finish()
    assert job.returncode != 0, out[-3000:]
    assert out.count("ERROR: lost the rendezvous service rendezvous:29400") == 2, out[-3000:]
    assert "Traceback" not in out and "frame #" not in out, out[-3000:]
    assert "make up: FAILED: a node exited with status 1" in out
    # make exits 2 from a failed recipe: the job's own status is for scripts in build/status.
    assert job.returncode == 2 and (project.root / "build" / "status").read_text() == "1\n"
    assert project.compose("ps", "-q").stdout.strip() == "", "no container may be left running"
    # The ranks stopped after a save: the next `make up` resumes from it.
    saved = re.search(r"stop requested: saved (\S+): epoch \d+ done", out)
    assert saved, out[-3000:]
    again = project.make("up", args.replace("50", "3"))
    assert f"resumed from {saved.group(1)}" in again.stdout, again.stdout[-3000:]


def test_a_node_whose_processes_die_by_themselves_is_restarted_and_rejoins(project):
    """Not `docker kill` (Docker never restarts what it was told to kill): the node's own
    processes die, as in an out-of-memory kill, and its container exits 137."""
    job = project.start_up(
        "ARGS=--epochs 20 --samples 4096 --save-every-steps 20 --checkpoint-dir /checkpoints/oom"
    )
    job.read_until(r"epoch 2/20")  # 20 epochs: time for the node to come back before the end
    node = f"{project.name}-node-2"
    sh(["docker", "exec", node, "kill", "-KILL", "-1"], check=False)  # all but PID 1 (init)
    job.read_until(r"resumed from \S+: epoch \d+ done")
    out = job.finish()
    assert job.returncode == 0, out[-3000:]
    restarts = sh(["docker", "inspect", "-f", "{{.RestartCount}}", node]).stdout.strip()
    assert restarts == "1", out[-3000:]
    # It came back into the job: the last round had both nodes again.
    assert re.findall(r"world size (\d+)", out)[-1] == "2", out[-3000:]
    assert project.exit_codes() == ["node 0", "node 0", "rendezvous 0"]


def test_restarts_exhausted_fail_with_a_reason(project):
    (project.root / "crash.py").write_text(CRASHING_SCRIPT)
    started = time.monotonic()
    result = project.make("up", "SCRIPT=crash.py", "MAX_RESTARTS=1", check=False, timeout=300)
    seconds = time.monotonic() - started
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert (project.root / "build" / "status").read_text() == "3\n"
    # Each of the 2 nodes ran it, and torchrun ran it once more on each (a container restart
    # may add a run); with no restart it would be 2.
    assert out.count("crashing on purpose") >= 4, out[-3000:]
    # The job's status is the script's own, not torchrun's generic 1.
    assert "make up: FAILED: a node exited with status 3" in out
    assert project.compose("ps", "-q").stdout.strip() == ""
    # Every node exited with the script's status (the service, once the job had failed, by
    # itself).
    assert project.exit_codes() == ["node 3", "node 3", "rendezvous 0"]
    record(restarts_exhausted_to_exit_s=round(seconds, 1))


def test_make_down_saves_a_checkpoint_and_next_up_resumes(project):
    args = "ARGS=--epochs 40 --samples 8192 --checkpoint-dir /checkpoints/graceful"
    job = project.start_up(args)
    job.read_until(r"epoch 2/40")
    time.sleep(1)
    started = time.monotonic()
    project.make("down")
    stopped = time.monotonic() - started
    out = job.finish()
    # From rank 0's own log: Compose may stop streaming a container's output before its last
    # lines when `make down` removes it.
    train_log = (project.root / "logs" / "train.log").read_text()
    saved = re.search(
        r"stop requested: saved /checkpoints/graceful/(\S+): epoch \d+ done, (\d+) of", train_log
    )
    assert saved, out[-3000:]
    assert "make up: STOPPED" in out
    # Every node stopped by itself: no torchrun took the others' exit for a failure and restarted
    # the job until the grace period ran out and Docker killed it.
    assert len(re.findall(r"\] world size", out)) == 1, out[-3000:]
    assert "exited with code 137" not in out
    assert (project.root / "checkpoints" / "graceful" / saved.group(1)).exists()
    again = project.make("up", args.replace("40", "4"))
    assert re.search(
        rf"resumed from /checkpoints/graceful/{re.escape(saved.group(1))}", again.stdout
    )
    assert "epoch 4/4" in again.stdout
    record(make_down_during_training_s=round(stopped, 1))


# netem adds latency; kernels without sch_netem (this CI's) get a token-bucket rate limit.
SLOW_LINKS = (
    ["netem", "delay", "5ms"],
    ["tbf", "rate", "20mbit", "burst", "32kbit", "latency", "400ms"],
)


def slow_down(pid):
    """Slow a node's interface from the host (the containers have no NET_ADMIN)."""
    for qdisc in SLOW_LINKS:
        added = sh(
            ["nsenter", "-t", pid, "-n", "tc", "qdisc", "add", "dev", "eth0", "root", *qdisc],
            check=False,
        )
        if added.returncode == 0:
            return " ".join(qdisc)
        assert "qdisc kind is unknown" in added.stderr, added.stderr
    raise AssertionError("no qdisc to slow the link with")


def bytes_through_the_slow_link(pid):
    """Bytes the node's slowed interface sent, read until the node exits (its network namespace
    goes with it): a bounded poll of the qdisc's counter."""
    sent, deadline = 0, time.monotonic() + 600
    while time.monotonic() < deadline:
        shown = sh(
            ["nsenter", "-t", pid, "-n", "tc", "-s", "qdisc", "show", "dev", "eth0"], check=False
        )
        counted = re.search(r"Sent (\d+) bytes", shown.stdout)
        if shown.returncode != 0 or not counted:
            return sent
        sent = max(sent, int(counted.group(1)))
        time.sleep(0.5)
    return sent


def test_slow_network_still_completes(project):
    """The same job with and without a slow link on one node's interface."""
    rates, link = {}, None
    for slow in (False, True):
        env = {"ARGS": f"--epochs 2 --samples 2048 --checkpoint-dir /checkpoints/slow-{slow}"}
        project.compose("down", "--remove-orphans")
        try:
            project.compose("up", "--detach", "--no-deps", "rendezvous", "node", **env)
            pid = sh(["docker", "inspect", "-f", "{{.State.Pid}}", f"{project.name}-node-1"])
            if slow:
                link = slow_down(pid.stdout.strip())
            project.compose(
                "up", "--detach", "--no-deps", "--no-recreate", "--scale", "node=2", "node", **env
            )
            if slow:
                shaped = bytes_through_the_slow_link(pid.stdout.strip())
            project.compose("wait", "node", timeout=600)
            log = project.logs("node")
        finally:
            project.compose("down", "--remove-orphans")
        assert "epoch 2/2" in log and "final loss" in log, log[-2000:]
        assert re.search(r"weights by rank: 0@\S+=(\w+) 1@\S+=\1$", log, re.MULTILINE), log
        rates[slow] = float(re.findall(r"epoch 2/2 .* samples/s (\d+)", log)[-1])
    # The premise: the job's traffic went through the slowed link (2 epochs of all-reduces of
    # the model's gradients are megabytes; a link that carried none would prove nothing).
    assert shaped > 2**20, shaped
    record(
        slow_link=link,
        slow_link_samples_per_s=rates[True],
        normal_link_samples_per_s=rates[False],
        slow_link_slowdown=round(rates[False] / rates[True], 2),
    )


def test_a_node_gives_up_when_the_rendezvous_service_never_comes(project):
    project.compose("down", "--remove-orphans")
    started = time.monotonic()
    code, out = project.run("node", WAIT_TIMEOUT="3")
    assert code == 1
    assert "ERROR: the rendezvous service rendezvous:29400 did not answer within 3s" in out
    assert time.monotonic() - started < 60


def test_unreadable_data_dir_is_refused_with_a_message(project):
    data = project.root / "data"
    mode = data.stat().st_mode
    data.chmod(0o000)
    try:
        result = project.make("up", check=False, timeout=300)
    finally:
        data.chmod(mode)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    # Once per node, with MAX_RESTARTS at its default: a restart cannot fix it.
    assert out.count("ERROR: data directory /data is not readable by uid 1000") == 2, out[-3000:]
    assert "make up: FAILED: a node exited with status 2" in out


def test_corrupt_checkpoint_is_moved_aside_not_deleted(project):
    folder = project.root / "checkpoints" / "corrupt"
    folder.mkdir()
    (folder / "ckpt-epoch0009.pt").write_bytes(b"not a checkpoint")
    sh(["chown", "-R", "1000:1000", folder])
    result = project.make(
        "up", "ARGS=--epochs 1 --samples 512 --checkpoint-dir /checkpoints/corrupt"
    )
    assert "does not load" in result.stdout
    assert (folder / "ckpt-epoch0009.pt.corrupt").read_bytes() == b"not a checkpoint"
    assert (folder / "ckpt-epoch0001.pt").exists()


def test_a_node_sees_no_git_data_checkpoints_or_secrets_of_the_project_folder(project):
    """The nodes run the image's copy of the code (no bind mount of the project folder), and the
    build leaves out what is not code: a node cannot read them."""
    planted = [
        ".git/config",
        "data/cat/1.png",
        "checkpoints/ckpt-epoch0001.pt",
        ".env.local",
        "docker/server.key",
        "id_rsa.pem",
        "id_rsa",
        "keys/id_ed25519",
    ]
    for path in planted:
        target = project.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("secret")
    try:
        project.make("build")
        code, out = project.run(
            "node", "find", "/app", "-path", "/app/.venv", "-prune", "-o", "-print"
        )
    finally:
        for path in planted:
            (project.root / path).unlink()
    listing = out.split()
    assert code == 0, out
    # The code belongs to root: the training user can read it, not change it.
    code, owner = project.run("node", "sh", "-c", "stat -c %U /app/train_dist.py; touch /app/x")
    assert code != 0 and owner.startswith("root\n") and "Permission denied" in owner, owner
    assert (project.root / ".env").is_file()  # the project's settings, which may hold tokens
    for path in [*planted, ".env"]:
        assert f"/app/{path}" not in listing
    assert "/app/train_dist.py" in listing


# Sends a signal (SIGSTOP, SIGCONT) to the training processes of a node: the children of its
# launcher, PID 1's child (docker-init is PID 1), but its log copy (tee).
SIGNAL_RANKS = """
import os, signal, sys
def stat(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
pids = [p for p in os.listdir("/proc") if p.isdigit()]
launcher = next(p for p in pids if stat(p)[1] == "1")
for pid in pids:
    if stat(pid)[1] == launcher and open(f"/proc/{pid}/comm").read().strip() != "tee":
        os.kill(int(pid), getattr(signal, sys.argv[1]))
        print(sys.argv[1], pid)
"""
# The node's heartbeat: its time, or "none" (no batch yet, or a phase that forgets it).
HEARTBEAT = """import os; p = os.environ["HEALTH_FILE"]
print(os.stat(p).st_mtime if os.path.exists(p) else "none")"""


def heartbeats(containers):
    return [sh(["docker", "exec", c, "python", "-c", HEARTBEAT]).stdout.strip() for c in containers]


def stop_a_rank_while_every_node_trains(nodes):
    """SIGSTOP node 1's rank at a moment when both nodes then keep an old heartbeat: not in a
    checkpoint save or a round's start, which forget it (docs/health.md) and so stay healthy as
    long as their own timeout allows. Bounded retries: such phases are a few percent of an epoch."""
    for _ in range(5):
        stopped = sh(["docker", "exec", nodes[0], "python", "-c", SIGNAL_RANKS, "SIGSTOP"]).stdout
        assert stopped.count("SIGSTOP") == 1, stopped
        before = heartbeats(nodes)
        time.sleep(1.5)  # a node still taking batches touches its heartbeat within a second
        if "none" not in before and heartbeats(nodes) == before:
            return
        sh(["docker", "exec", nodes[0], "python", "-c", SIGNAL_RANKS, "SIGCONT"])
        time.sleep(2)
    raise AssertionError("never stopped a rank while both nodes had a heartbeat")


def health(container):
    return sh(["docker", "inspect", "-f", "{{.State.Health.Status}}", container]).stdout.strip()


def wait_for_health(containers, status, timeout=180):
    """Bounded poll until every container reports `status`; the last statuses seen."""
    deadline = time.monotonic() + timeout
    while True:
        seen = {name: health(name) for name in containers}
        if set(seen.values()) == {status} or time.monotonic() > deadline:
            return seen
        time.sleep(2)


def test_a_node_whose_rank_hangs_in_a_collective_turns_unhealthy_and_so_do_its_peers(project):
    job = project.start_up(
        "NODES=2",
        "HEALTH_TIMEOUT=5",
        "ARGS=--epochs 50 --samples 8192 --checkpoint-dir /checkpoints/health",
    )
    try:
        job.read_until(r"epoch 1/50")
        nodes = [f"{project.name}-node-1", f"{project.name}-node-2"]
        assert wait_for_health(nodes, "healthy") == dict.fromkeys(nodes, "healthy")
        stop_a_rank_while_every_node_trains(nodes)
        # The stopped rank makes no step; its peer waits for it in the next all-reduce.
        assert wait_for_health(nodes, "unhealthy") == dict.fromkeys(nodes, "unhealthy")
        assert project.make("ps").stdout.count("(unhealthy)") == 2
    finally:
        project.compose("kill")
        job.finish()
