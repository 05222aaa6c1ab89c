"""docker/launch.sh as a node runs it, here on one machine: how torchrun starts the script, and a
worker's wait for the master."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """\
import json, os, sys
seen = {"torch_loaded": "torch" in sys.modules, "name": __name__, "path0": sys.path[0],
        "rank": os.environ["RANK"], "world": os.environ["WORLD_SIZE"], "argv": sys.argv[1:]}
print("PROBE " + json.dumps(seen), flush=True)
"""
UNSET = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOG_DIR", "DDP_BACKEND", "START_METHOD", "NODE_ROLE"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, **env):
    (tmp_path / "probe.py").write_text(PROBE)
    # The launcher runs `python`: the interpreter running these tests, as in the image.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    # Not what the shell running the tests may hold (inside a node's container, say).
    inherited = {k: v for k, v in os.environ.items() if k not in UNSET}
    env = {
        **inherited,
        "PATH": path,
        "SCRIPT": str(tmp_path / "probe.py"),
        "ARGS": "--flag value",
        "NODE_ROLE": "master",
        "MASTER_ADDR": "127.0.0.1",
        "RDZV_PORT": str(free_port()),
        "NNODES": "1",
        "NPROC_PER_NODE": "2",
        "MAX_RESTARTS": "0",
        "RUN_ID": f"test-{os.getpid()}",
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "docker" / "launch.sh")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


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
