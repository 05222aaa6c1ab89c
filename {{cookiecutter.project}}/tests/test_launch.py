"""The launcher (launcher/node.py) as a node runs it, here on one machine: how torchrun starts
the script, the wait for the rendezvous service, the address a node announces, restarts and exit
codes."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nodes
import pytest
from nodes import UNSET, free_port

from launcher import node as launcher_node
from launcher import settings

ROOT = Path(__file__).resolve().parents[1]
PROBE = """\
import json, os, sys
seen = {"torch_loaded": "torch" in sys.modules, "name": __name__, "path0": sys.path[0],
        "rank": os.environ["RANK"], "world": os.environ["WORLD_SIZE"], "argv": sys.argv[1:]}
# One write per line: torchrun runs scripts unbuffered (python -u), where print() writes the text
# and the newline apart, and two ranks' lines could interleave.
sys.stdout.write("PROBE " + json.dumps(seen) + "\\n")
"""


def start(tmp_path, **env):
    """The launcher as one node running the probe, in the background."""
    (tmp_path / "probe.py").write_text(PROBE)
    defaults = {
        "SCRIPT": str(tmp_path / "probe.py"),
        "ARGS": "--flag value",
        "RDZV_HOST": "1",  # a one-node job hosts its own store, as `make train-local` does
        "RDZV_PORT": str(free_port()),
        "NODES": "1",
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": "0",
        "RUN_ID": f"test-{os.getpid()}",
    }
    return nodes.start(**{**defaults, **env})


def launch(tmp_path, **env):
    """The launcher as one node, to its end."""
    node = start(tmp_path, **env)
    stdout, _ = node.communicate(timeout=300)
    return subprocess.CompletedProcess(node.args, node.returncode, stdout)


def probes(output):
    return [
        json.loads(line.split("PROBE ", 1)[1]) for line in output.splitlines() if "PROBE " in line
    ]


@pytest.mark.parametrize("method, torch_loaded", [("fork", True), ("spawn", False)])
def test_script_runs_as_main_with_torchruns_contract(tmp_path, method, torch_loaded):
    result = launch(tmp_path, START_METHOD=method)
    assert result.returncode == 0, result.stdout
    seen = sorted(probes(result.stdout), key=lambda p: p["rank"])
    assert [p["rank"] for p in seen] == ["0", "1"], result.stdout
    for probe in seen:
        # fork: the process comes from torchrun's agent, which has imported torch: no second import.
        assert probe["torch_loaded"] is torch_loaded
        assert probe["name"] == "__main__"
        assert probe["path0"] == str(tmp_path)  # the script's folder, as `python probe.py` has it
        assert probe["world"] == "2"
        assert probe["argv"] == ["--flag", "value"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"START_METHOD": "thread"}, "ERROR: START_METHOD must be fork or spawn, not 'thread'"),
        # The agent initialises CUDA; a process forked from it cannot use CUDA.
        ({"START_METHOD": "fork", "DDP_BACKEND": "nccl"}, "ERROR: START_METHOD=fork cannot use"),
    ],
)
def test_start_methods_that_cannot_work_are_refused(tmp_path, env, message):
    result = launch(tmp_path, **env)
    assert result.returncode == 2
    assert message in result.stdout


def test_a_node_imports_torch_before_it_waits_for_the_rendezvous_service(tmp_path):
    port = free_port()  # nothing listens there
    result = launch(
        tmp_path,
        RDZV_HOST="0",
        RDZV_PORT=str(port),
        WAIT_TIMEOUT="1",
        PYTHONPROFILEIMPORTTIME="1",
    )
    assert result.returncode == 1, result.stdout
    message = f"ERROR: the rendezvous service 127.0.0.1:{port} did not answer within 1s"
    assert message in result.stdout
    lines = result.stdout.splitlines()
    imported = next(i for i, line in enumerate(lines) if re.search(r"\|\s+torch$", line))
    waiting = next(i for i, line in enumerate(lines) if line.startswith("waiting for the rendezv"))
    assert imported < waiting


EXITS = "import sys\nprint('SCRIPT RAN', flush=True)\nsys.exit({code})\n"
# Runs until the test creates the file `go`, then exits with `code`.
WAITS = """\
import os, sys, time
print("SCRIPT RAN", flush=True)
while not os.path.exists({go!r}):
    time.sleep(0.05)
sys.exit({code})
"""


@pytest.mark.parametrize(
    "code, max_restarts, runs",
    [
        (2, 3, 1),  # a usage or data error: a restart would fail the same way
        (3, 1, 2),  # any other failure is restarted
    ],
)
def test_the_node_exits_with_the_scripts_status_and_retries_all_but_usage_errors(
    tmp_path, code, max_restarts, runs
):
    (tmp_path / "exits.py").write_text(EXITS.format(code=code))
    marker = tmp_path / "marker"  # a first start: the launcher creates it
    result = launch(
        tmp_path,
        SCRIPT=str(tmp_path / "exits.py"),
        MAX_RESTARTS=str(max_restarts),
        NODE_MARKER=str(marker),
    )
    assert result.returncode == code, result.stdout
    assert result.stdout.count("SCRIPT RAN") == 2 * runs, result.stdout  # 2 processes a run
    assert f"exited with status {code}" in result.stdout
    assert "Traceback" not in result.stdout
    # A node container that Docker restarts reads it there.
    assert marker.read_text() == f"{code}\n"


def test_an_error_on_one_rank_ends_every_rank_once_with_status_2(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "ckpt").write_text("a file where rank 0 wants its checkpoint folder")
    folders = f"--data-dir {tmp_path}/data --checkpoint-dir {tmp_path}/ckpt --log-dir {tmp_path}"
    result = launch(tmp_path, SCRIPT="train_dist.py", ARGS=folders, MAX_RESTARTS="3")
    assert result.returncode == 2, result.stdout
    # Rank 1 stopped with rank 0 instead of waiting for it in a collective, and no one retried.
    assert result.stdout.count("ERROR: ") == 1, result.stdout
    assert f"ERROR: {tmp_path}/ckpt is a file, not a folder" in result.stdout
    assert "Traceback" not in result.stdout


def limit_file_size():
    """In the node's process, before it starts: files may not grow past 64 KB (the kernel then
    refuses the write, as a full disk does). The default task's checkpoint is about 85 KB."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, resource.RLIM_INFINITY))


def test_a_full_disk_during_a_save_stops_every_rank_with_one_line_and_no_restart(tmp_path):
    (tmp_path / "data").mkdir()
    folders = f"--data-dir {tmp_path}/data --checkpoint-dir {tmp_path}/ckpt --log-dir {tmp_path}"
    node = start(
        tmp_path,
        SCRIPT="train_dist.py",
        ARGS=f"{folders} --epochs 2 --samples 256",
        MAX_RESTARTS="3",
        preexec=limit_file_size,
    )
    stdout, _ = node.communicate(timeout=300)
    assert node.returncode == 2, stdout
    assert stdout.count("ERROR: ") == 1, stdout
    # The first save of the job: best.pt, written before the epoch's checkpoint at its end.
    assert f"ERROR: cannot write checkpoint {tmp_path}/ckpt/best.pt: " in stdout
    assert "Traceback" not in stdout
    assert stdout.count("world size 2") == 1, stdout  # one run: a status 2 is not restarted
    assert not list((tmp_path / "ckpt").iterdir())  # no partial file left behind


def test_a_finished_two_node_job_ends_cleanly_on_both_nodes_and_its_rendezvous_service(tmp_path):
    """Every node closes the rendezvous as it ends and the service then stops, within a moment of
    the last node (`make up` returns when it has: 0.3 s measured, bound 3x the 1 s goal): no node
    may print a failed close or a connection error with a C++ stack."""
    job = {"RDZV_PORT": str(free_port()), "RUN_ID": f"two-nodes-{os.getpid()}"}
    service = nodes.rendezvous(**job)
    started = [
        start(tmp_path, RDZV_HOST="0", NODES="2", NPROC_PER_NODE="1", START_METHOD="fork", **job)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in started]
    nodes_ended = time.monotonic()
    assert service.finish(timeout=60) == 0, service.output
    assert time.monotonic() - nodes_ended < 3, service.output
    for node, output in zip(started, outputs, strict=True):
        assert node.returncode == 0, output
        for trace in ("Traceback", "frame #", "failed to shutdown", "Error"):
            assert trace not in output, output
    assert sorted(p["rank"] for out in outputs for p in probes(out)) == ["0", "1"]
    assert "the job's rendezvous is closed: stopping" in service.output


def test_the_rendezvous_service_outlives_the_job_until_every_node_on_its_roll_has_left():
    """A node that signed in (launcher/roll.py) may still ask how the job ended: the service
    stays after the job's rendezvous is closed until it signs out, then ends at once."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    from launcher import roll

    job = {"RDZV_PORT": str(free_port()), "RUN_ID": f"roll-{os.getpid()}"}
    service = nodes.rendezvous(**job)
    service.wait_for("rendezvous: serving")
    store = roll.service_store("127.0.0.1", int(job["RDZV_PORT"]))
    signed = roll.Signed(store, job["RUN_ID"], "127.0.0.1")  # on its way in: no heartbeat yet
    backend = C10dRendezvousBackend(store, job["RUN_ID"])
    DynamicRendezvousHandler.from_backend(job["RUN_ID"], store, backend, 1, 1).set_closed()
    service.wait_for("the job's rendezvous is closed")
    time.sleep(2)
    assert service.process.poll() is None, service.output
    left = time.monotonic()
    signed.sign_out(0)
    assert service.finish(timeout=30) == 0, service.output
    assert time.monotonic() - left < 3


def test_the_rendezvous_service_listens_only_on_the_address_it_is_given():
    port = free_port()
    service = nodes.Node(
        "launcher.rendezvous",
        RDZV_PORT=str(port),
        RUN_ID="bound",
        RDZV_BIND="127.0.0.2",
        IDLE_TIMEOUT="3",
    )
    service.wait_for("rendezvous: serving bound on 127.0.0.2:")
    socket.create_connection(("127.0.0.2", port), timeout=5).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert service.finish(timeout=60) == 0, service.output  # no node came: it ends by itself


def test_a_store_client_without_the_run_id_changes_nothing_the_job_does(tmp_path):
    """A stranger who reaches the rendezvous port but guesses the run id wrong (the project's
    name, here) closes "the" rendezvous and records a failed status: the job, under its secret
    id, neither sees nor reports either (docs/security.md)."""
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    job = {"RDZV_PORT": str(free_port()), "RUN_ID": f"secret-{os.getpid()}-{os.urandom(8).hex()}"}
    service = nodes.rendezvous(**job)
    store = TCPStore("127.0.0.1", int(job["RDZV_PORT"]), is_master=False, timeout=timedelta(60))
    guess = job["RUN_ID"].split("-")[0]
    backend = C10dRendezvousBackend(store, guess)
    DynamicRendezvousHandler.from_backend(guess, store, backend, 1, 1).set_closed()
    store.set(launcher_node.VERDICT_KEY + guess, "3")
    node = {"RDZV_HOST": "0", "NPROC_PER_NODE": "1", "START_METHOD": "fork", **job}
    started = [start(tmp_path, NODES="2", **node) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in started]
    for process, output in zip(started, outputs, strict=True):
        assert process.returncode == 0, output
    assert sorted(p["rank"] for out in outputs for p in probes(out)) == ["0", "1"]
    assert service.finish(timeout=60) == 0, service.output
    assert "the job's rendezvous is closed: stopping" in service.output


@pytest.mark.parametrize(
    "code, message",
    [
        (0, "the job finished before this node was taken in: nothing to do"),
        (3, "ERROR: the job ended with status 3 before this node was taken in"),
    ],
)
def test_a_node_on_its_way_in_when_the_job_ends_exits_with_the_jobs_status(tmp_path, code, message):
    """A node still on its way in when the job ends (a `make scale` at the last step, a node
    Docker restarted, a spare) reports what the job ended with, so that `make up` neither fails a
    finished job nor passes a failed one: the rendezvous service, which holds the job's status,
    waits for it (launcher/roll.py), then ends within a moment of it."""
    go = tmp_path / "go"
    (tmp_path / "waits.py").write_text(WAITS.format(go=str(go), code=code))
    job = {"RDZV_PORT": str(free_port()), "RUN_ID": f"late-{os.getpid()}-{code}"}
    node = {"RDZV_HOST": "0", "NPROC_PER_NODE": "1", "START_METHOD": "fork", **job}
    node.update(NODES="1", MAX_NODES="1", MAX_RESTARTS="0", ARGS="")
    node["SCRIPT"] = str(tmp_path / "waits.py")
    service = nodes.rendezvous(**job)
    first = nodes.Node(**node)
    first.wait_for("SCRIPT RAN")
    late = nodes.Node(**node)
    late.wait_for(r"rendezvous 127\.0\.0\.1:\d+ is up")  # it signs in next, then joins
    go.touch()
    assert first.finish() == code, first.output
    assert late.finish() == code, late.output
    ended = time.monotonic()
    assert message in late.output
    assert "SCRIPT RAN" not in late.output and "Traceback" not in late.output
    assert service.finish(timeout=60) == 0, service.output
    assert time.monotonic() - ended < 3, service.output


def test_a_node_restarted_after_a_usage_error_does_not_start_the_job_again(tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("2\n")  # what the last run wrote
    result = launch(tmp_path, NODE_MARKER=str(marker))
    assert result.returncode == 2
    assert "ERROR: not restarting: the last run ended with a usage or data error" in result.stdout
    assert "PROBE" not in result.stdout


def test_a_restarted_node_whose_job_is_gone_exits_before_importing_torch_as_it_last_ended(
    tmp_path,
):
    marker = tmp_path / "marker"
    marker.write_text("137\n")  # killed; Docker restarted the container
    port = free_port()  # nothing listens there: the job ended and its rendezvous service too
    result = launch(
        tmp_path,
        RDZV_HOST="0",
        NODE_MARKER=str(marker),
        RDZV_PORT=str(port),
        REJOIN_TIMEOUT="1",
        WAIT_TIMEOUT="100",
        PYTHONPROFILEIMPORTTIME="1",
    )
    # Still the killed node: `make up` does not count it as a failure of the job.
    assert result.returncode == 137, result.stdout
    message = f"ERROR: the rendezvous service 127.0.0.1:{port} did not answer within 1s"
    assert message in result.stdout
    assert not re.search(r"\|\s+torch$", result.stdout, re.MULTILINE)


@pytest.mark.parametrize(
    "env, address",
    [
        ({"RDZV_ADDR": "127.0.0.1"}, "127.0.0.1"),  # the interface that reaches the service
        ({"RDZV_ADDR": "127.0.0.1", "LOCAL_ADDR": "10.1.2.3"}, "10.1.2.3"),
        ({"RDZV_ADDR": "no-such-host.invalid"}, socket.gethostname()),
    ],
)
def test_a_node_announces_an_address_the_others_can_dial(monkeypatch, env, address):
    for name in UNSET | {"LOCAL_ADDR"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launcher_node.local_address() == address


@pytest.mark.parametrize(
    "nproc, backend, gpus, expected",
    [
        ("2", "gloo", 0, 2),
        ("gpu", "nccl", 4, 4),  # one process per GPU the node sees
        ("2", "nccl", 2, 2),
        ("2", "nccl", 1, "NPROC_PER_NODE=2 on 1 GPU(s): nccl cannot share a GPU between ranks"),
        ("gpu", "nccl", 0, "this node sees no GPU"),
        ("two", "gloo", 0, "NPROC_PER_NODE must be a whole number >= 1 or gpu, not 'two'"),
    ],
)
def test_processes_per_node_fit_the_gpus_the_node_sees(monkeypatch, nproc, backend, gpus, expected):
    """A faked GPU count: with nccl, two ranks on one GPU are refused before training."""
    monkeypatch.setenv("NPROC_PER_NODE", nproc)
    monkeypatch.setenv("DDP_BACKEND", backend)
    if isinstance(expected, int):
        assert launcher_node.processes(gpus=gpus) == expected
    else:
        with pytest.raises(launcher_node.Refused, match=re.escape(expected)):
            launcher_node.processes(gpus=gpus)


def test_a_starting_node_forgets_its_last_runs_heartbeat(tmp_path):
    """A restarted container keeps its files: the old heartbeat would date the new run."""
    beat = tmp_path / "health"
    beat.touch()
    result = launch(tmp_path, HEALTH_FILE=str(beat))
    assert result.returncode == 0, result.stdout
    assert not beat.exists()  # the probe takes no batch: the node is still "starting"


def test_a_knob_comes_from_the_environment_else_from_dot_env_and_has_no_other_default(
    monkeypatch, tmp_path
):
    (tmp_path / ".env").write_text("# a comment=no\nWAIT_TIMEOUT=7\nARGS=--epochs 3 --lr 0.1\n")
    monkeypatch.setattr(settings, "ENV_FILE", tmp_path / ".env")
    for name in settings.KNOBS:
        monkeypatch.delenv(name, raising=False)
    assert launcher_node.setting("WAIT_TIMEOUT") == "7"
    assert launcher_node.setting("ARGS") == "--epochs 3 --lr 0.1"
    monkeypatch.setenv("WAIT_TIMEOUT", "9")  # what the engine passes wins
    assert launcher_node.setting("WAIT_TIMEOUT") == "9"
    monkeypatch.setenv("REJOIN_TIMEOUT", "")  # empty: .env's, else empty (ARGS in an image)
    assert launcher_node.setting("REJOIN_TIMEOUT") == ""
    monkeypatch.delenv("REJOIN_TIMEOUT")
    with pytest.raises(settings.Refused, match="REJOIN_TIMEOUT is not set: pass it to every"):
        launcher_node.setting("REJOIN_TIMEOUT")


def test_a_node_without_its_knobs_is_refused_in_one_line(tmp_path):
    """An image has no .env: an engine that passed no knob gets a usage error, not a default."""
    (tmp_path / "probe.py").write_text(PROBE)
    copy = tmp_path / "project"  # the launcher and the exit codes, no .env: as in an image
    shutil.copytree(ROOT / "launcher", copy / "launcher")
    shutil.copytree(ROOT / "{{ cookiecutter.package }}", copy / "{{ cookiecutter.package }}")
    inherited = {k: v for k, v in os.environ.items() if k not in UNSET and k not in settings.KNOBS}
    result = subprocess.run(
        [sys.executable, "-m", "launcher"],
        cwd=copy,
        env={**inherited, "SCRIPT": str(tmp_path / "probe.py")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "ERROR: START_METHOD is not set: pass it to every node, or run beside the project's .env"
    ]


@pytest.mark.parametrize(
    "knob, value, argument",
    [
        ("JOIN_TIMEOUT", "77", "join_timeout=77"),
        ("LAST_CALL_TIMEOUT", "4", "last_call_timeout=4"),
        ("RDZV_TIMEOUT", "33", "read_timeout=33"),
        ("HEARTBEAT_INTERVAL", "2", "keep_alive_interval=2"),
        ("HEARTBEAT_MISSES", "5", "keep_alive_max_attempt=5"),
        ("MAX_RESTARTS", "6", "--max-restarts=6"),
        ("NODES", "4", "--nnodes=4"),
        ("NPROC_PER_NODE", "3", "--nproc-per-node=3"),
    ],
)
def test_every_rendezvous_knob_reaches_torchrun(monkeypatch, tmp_path, knob, value, argument):
    monkeypatch.setenv(knob, value)
    arguments = launcher_node.torchrun_arguments(tmp_path / "probe.py")
    assert any(argument in part for part in arguments), arguments


def test_a_node_stopped_by_sigterm_exits_143_after_its_ranks_saved(tmp_path):
    (tmp_path / "data").mkdir()
    folders = f"--data-dir {tmp_path}/data --checkpoint-dir {tmp_path}/ckpt --log-dir {tmp_path}"
    node = start(tmp_path, SCRIPT="train_dist.py", ARGS=f"--epochs 50 --samples 4096 {folders}")
    lines = []
    for line in node.stdout:
        lines.append(line)
        if "epoch 1/50" in line:
            node.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + node.communicate(timeout=120)[0]
    # Stopped, not failed: 128 + SIGTERM, as `docker stop` of a plain process gives.
    assert node.returncode == 143, out
    assert "stop requested: saved" in out and "torchrun: stopped by SIGTERM" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "files, cpus",
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, docker --cpus 2
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU is still one thread
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5: rounded up
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
        ({"cpu.max": "max 100000\n"}, None),  # no limit: the CPUs this process may run on
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files (macOS, a chroot)
    ],
    ids=["v2", "v2-half", "v2-fraction", "v1", "v2-max", "v1-unlimited", "none"],
)
def test_threads_follow_the_cgroup_cpu_limit(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    expected = cpus or len(os.sched_getaffinity(0))
    assert launcher_node.cpu_limit(tmp_path) == expected


@pytest.mark.parametrize("cpus, nproc, threads", [(4, "2", "2"), (2, "4", "1"), (3, "2", "1")])
def test_omp_threads_are_the_cpu_limit_over_the_processes(monkeypatch, cpus, nproc, threads):
    # What prepare_processes sets goes back to what it was after the test.
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", nproc)
    monkeypatch.setattr(launcher_node, "cpu_limit", lambda: cpus)
    monkeypatch.setattr(sys, "path", list(sys.path))  # prepare_processes sets sys.path[0]
    launcher_node.prepare_processes(ROOT / "train_dist.py")
    assert os.environ["OMP_NUM_THREADS"] == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's own choice stands
    launcher_node.prepare_processes(ROOT / "train_dist.py")
    assert os.environ["OMP_NUM_THREADS"] == "7"


@pytest.mark.parametrize("code, status", [(3, 3), (2, 2), (-9, 137), (-15, 143), (-6, 134), (0, 1)])
def test_a_process_killed_by_signal_n_is_status_128_plus_n(code, status):
    assert launcher_node.node_status(code) == status


@pytest.mark.parametrize(
    "written, status",
    [
        (None, None),  # no marker yet: a first start, which creates it
        ("", 137),  # created, never written: the last run was killed before it could
        ("2\n", 2),
        ("0\n", 0),
        ("143\n", 143),
    ],
)
def test_a_restart_reads_the_status_its_last_run_wrote(tmp_path, written, status):
    marker = tmp_path / "marker"
    if written is not None:
        marker.write_text(written)
    assert launcher_node.last_status(str(marker)) == status
    assert marker.exists()
    assert launcher_node.last_status("") is None  # no marker set: never a restart


# A task whose step fails on rank 1 after its first optimizer step: a bug nobody checked for.
FAILS_LATER = """
import importlib.util
import os

spec = importlib.util.spec_from_file_location("the_default_task", "@TASK@")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)
add_arguments, datasets, model, optimizer = (
    base.add_arguments, base.datasets, base.model, base.optimizer
)
calls = 0


def step(model, batch):
    global calls
    calls += 1
    if calls == 3 and os.environ["RANK"] == "1":
        raise ValueError("boom in the third batch")
    return base.step(model, batch)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_rank_that_fails_has_its_traceback_printed_once_by_the_node_and_logged(tmp_path, method):
    (tmp_path / "fails_later.py").write_text(FAILS_LATER.replace("@TASK@", str(ROOT / "task.py")))
    folders = f"--data-dir {tmp_path} --checkpoint-dir {tmp_path / 'ckpt'} --log-dir {tmp_path}"
    result = launch(
        tmp_path,
        SCRIPT=str(ROOT / "train_dist.py"),
        ARGS=f"--task {tmp_path / 'fails_later.py'} --samples 256 --batch-size 16 {folders}",
        START_METHOD=method,
        LOG_DIR=str(tmp_path),
    )
    assert result.returncode == 1, result.stdout
    out = result.stdout
    assert out.count("Traceback") == 1 and out.count("ValueError: boom in the third batch") == 2
    assert re.search(r'fails_later.py", line \d+, in step\n +raise ValueError', out), out
    summary = out.strip().splitlines()[-1]
    assert summary == (
        "torchrun: rank 1 on node 127.0.0.1 exited with status 1: "
        "ValueError: boom in the third batch"
    ), out
    log = (tmp_path / "train.log").read_text()
    assert "Traceback" in log and summary in log


def test_the_first_failure_is_the_earliest_recorded_and_never_the_agents_own_stop():
    from types import SimpleNamespace

    def failure(text, when, exitcode=1):
        extra = {"time": when, "py_callstack": f"Traceback\n{text}"}
        return SimpleNamespace(
            message={"message": text, "extraInfo": extra}, timestamp=int(when), exitcode=exitcode
        )

    failures = {
        0: failure("RuntimeError: Connection closed by peer", 100.30),
        1: failure("ValueError: boom", 100.20),
        2: failure("SignalException: Process 7 got signal: 15", 100.10),
    }
    rank, message, status = launcher_node.first_failure(failures)
    assert (rank, message["message"], status) == (1, "ValueError: boom", 1)
    # A usage error (status 2, no error file) found first; torch then stopped rank 0 with
    # SIGTERM within the same whole second (CI once reported rank 0's 143 instead).
    # Found in either order: torch finds the first failure, then the ranks it stopped.
    for stopped in (-15, 143):  # killed, or ended by train_dist.py (distributed.Stopped)
        usage = SimpleNamespace(message="To enable traceback see", timestamp=100, exitcode=2)
        ended = SimpleNamespace(message="Signal 15 received", timestamp=100, exitcode=stopped)
        assert launcher_node.first_failure({1: usage, 0: ended}) == (1, {}, 2)
        assert launcher_node.first_failure({0: ended, 1: usage}) == (1, {}, 2)
