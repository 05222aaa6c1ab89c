"""docker/launch.py as a node runs it, here on one machine: the node's role, how torchrun starts
the script, a worker's wait for the master, restarts and exit codes."""

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import nodes
import pytest
from nodes import UNSET, free_port

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
    """docker/launch.py as one node running the probe, in the background."""
    (tmp_path / "probe.py").write_text(PROBE)
    defaults = {
        "SCRIPT": str(tmp_path / "probe.py"),
        "ARGS": "--flag value",
        "NODE_ROLE": "master",
        "MASTER_ADDR": "127.0.0.1",
        "RDZV_PORT": str(free_port()),
        "NNODES": "1",
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": "0",
        "RUN_ID": f"test-{os.getpid()}",
    }
    return nodes.start(**{**defaults, **env})


def launch(tmp_path, **env):
    """docker/launch.py as one node, to its end."""
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


def test_worker_imports_torch_before_it_waits_for_the_master(tmp_path):
    port = free_port()  # nothing listens there
    result = launch(
        tmp_path,
        NODE_ROLE="worker",
        RDZV_PORT=str(port),
        WAIT_TIMEOUT="1",
        PYTHONPROFILEIMPORTTIME="1",
    )
    assert result.returncode == 1, result.stdout
    assert f"ERROR: master 127.0.0.1:{port} did not answer within 1s" in result.stdout
    lines = result.stdout.splitlines()
    imported = next(i for i, line in enumerate(lines) if re.search(r"\|\s+torch$", line))
    waiting = next(i for i, line in enumerate(lines) if line.startswith("waiting for master"))
    assert imported < waiting


EXITS = "import sys\nprint('SCRIPT RAN', flush=True)\nsys.exit({code})\n"


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
    # A worker container that Docker restarts reads it there.
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


def test_a_finished_two_node_job_ends_cleanly_on_both_nodes(tmp_path):
    """The master hosts the rendezvous store and may exit first: the worker must not try to
    close the rendezvous in a store that is gone (a connection error with a C++ stack)."""
    port, run_id = free_port(), f"two-nodes-{os.getpid()}"
    nodes = [
        start(
            tmp_path,
            NODE_ROLE=role,
            NNODES="2",
            NPROC_PER_NODE="1",
            RDZV_PORT=str(port),
            RUN_ID=run_id,
            START_METHOD="fork",
        )
        for role in ("master", "worker")
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output
        for trace in ("Traceback", "frame #", "failed to shutdown", "Error"):
            assert trace not in output, output
    assert sorted(p["rank"] for out in outputs for p in probes(out)) == ["0", "1"]


def test_a_node_restarted_after_a_usage_error_does_not_start_the_job_again(tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("2\n")  # what the last run wrote
    result = launch(tmp_path, NODE_MARKER=str(marker))
    assert result.returncode == 2
    assert "ERROR: not restarting: the last run ended with a usage or data error" in result.stdout
    assert "PROBE" not in result.stdout


def test_a_restarted_worker_whose_master_is_gone_exits_before_importing_torch(tmp_path):
    marker = tmp_path / "marker"
    marker.write_text("137\n")  # killed; Docker restarted the container
    port = free_port()  # nothing listens there
    result = launch(
        tmp_path,
        NODE_ROLE="worker",
        NODE_MARKER=str(marker),
        RDZV_PORT=str(port),
        REJOIN_TIMEOUT="1",
        WAIT_TIMEOUT="100",
        PYTHONPROFILEIMPORTTIME="1",
    )
    assert result.returncode == 1, result.stdout
    assert f"ERROR: master 127.0.0.1:{port} did not answer within 1s" in result.stdout
    assert not re.search(r"\|\s+torch$", result.stdout, re.MULTILINE)


def load_launcher():
    spec = importlib.util.spec_from_file_location("launch", ROOT / "docker" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "env, role",
    [
        ({"NODE_ROLE": "worker", "MASTER_ADDR": socket.gethostname()}, "worker"),
        ({"JOB_COMPLETION_INDEX": "0", "MASTER_ADDR": "job-0.job"}, "master"),
        ({"JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "job-0.job"}, "worker"),
        # Two Slurm tasks on one node share the hostname: the task id decides.
        ({"SLURM_PROCID": "1", "MASTER_ADDR": socket.gethostname()}, "worker"),
        ({"MASTER_ADDR": socket.gethostname()}, "master"),
        ({"MASTER_ADDR": "master-host-elsewhere"}, "worker"),
        ({}, "master"),  # MASTER_ADDR defaults to 127.0.0.1: a one-node job
    ],
)
def test_the_role_is_decided_once_from_the_engine(monkeypatch, env, role):
    for name in UNSET | {"MASTER_ADDR"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_launcher().node_role() == role


def test_an_unknown_role_is_refused(tmp_path):
    result = launch(tmp_path, NODE_ROLE="boss")
    assert result.returncode == 2
    assert "ERROR: NODE_ROLE must be master or worker, not 'boss'" in result.stdout


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


def test_the_private_torch_names_the_launcher_relies_on_exist():
    """torch is pinned; a new pin must keep these or the launcher must change with it."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous as rdzv

    assert callable(LocalElasticAgent._monitor_workers)
    assert callable(LocalElasticAgent._rendezvous)
    assert callable(LocalElasticAgent._assign_worker_ranks)
    for name in ("next_rendezvous", "shutdown", "_stop_heartbeats", "_get_deadline"):
        assert callable(getattr(rdzv.DynamicRendezvousHandler, name)), name
    assert {"min_nodes", "max_nodes"} <= {
        f.name for f in dataclasses.fields(rdzv.RendezvousSettings)
    }
    assert callable(rdzv._RendezvousExitOp)
    assert callable(rdzv._RendezvousJoinOp.__call__)
    context = inspect.signature(rdzv._RendezvousContext).parameters
    assert {"state", "settings"} <= set(context)
    assert {"complete", "round"} <= set(vars(rdzv._RendezvousState()))
