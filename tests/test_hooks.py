"""Bad answers stop generation with one clear line each and no traceback."""

import re
import subprocess
import sys

import pytest

from helpers import TEMPLATE

BAD_ANSWERS = [
    ({"project": "My Project"}, "project 'My Project' is not a valid folder/Compose project name"),
    ({"project": "-lead"}, "project '-lead' is not a valid folder/Compose project name"),
    ({"package": "2fast"}, "package '2fast' is not a Python identifier"),
    ({"package": "class"}, "package 'class' is not a Python identifier"),
    ({"nodes": "0"}, "nodes must be a whole number >= 1, got '0'"),
    ({"nodes": "two"}, "nodes must be a whole number >= 1, got 'two'"),
    ({"cpus_per_node": "-1"}, "cpus_per_node must be a number (e.g. 1.0; 0: no limit)"),
    ({"memory_per_node": "2X"}, "memory_per_node must be a size such as 512M or 2G, got '2X'"),
    ({"shm_size": "big"}, "shm_size must be a size such as 512M or 2G, got 'big'"),
    ({"uid": "0"}, "uid must be auto (the user who builds) or a whole number >= 1, got '0'"),
    ({"torch_version": "latest"}, "torch_version must be a version such as 2.14.1"),
    ({"uid": "me"}, "uid must be auto (the user who builds) or a whole number >= 1, got 'me'"),
]


def generate(tmp_path, answers):
    args = [f"{k}={v}" for k, v in answers.items()]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cookiecutter",
            "--no-input",
            "-o",
            str(tmp_path),
            str(TEMPLATE),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("answers, message", BAD_ANSWERS, ids=[str(a) for a, _ in BAD_ANSWERS])
def test_bad_answer_is_refused_with_a_message(tmp_path, answers, message):
    result = generate(tmp_path, answers)
    assert result.returncode != 0
    assert f"ERROR: {message}" in result.stderr
    # cookiecutter 2.7 itself logs its FailedHookException with a traceback after our lines;
    # the hook must not crash on its own, so that is the only exception allowed to appear.
    named = set(re.findall(r"\b(\w+(?:Error|Exception))\b", result.stderr + result.stdout))
    assert named <= {"FailedHookException"}, named
    assert not any(tmp_path.iterdir()), "a refused project must leave no folder behind"


def test_unknown_python_version_is_refused_before_the_hook(tmp_path):
    # Choice answers are checked by cookiecutter itself (with its own traceback); the hook's
    # check of python_version guards replays of edited answer files.
    result = generate(tmp_path, {"python_version": "3.9"})
    assert result.returncode != 0
    assert "3.9 provided for choice variable python_version" in result.stderr
    assert not any(tmp_path.iterdir())


def test_every_bad_answer_is_reported_at_once(tmp_path):
    result = generate(tmp_path, {"nodes": "0", "memory_per_node": "2X"})
    assert result.stderr.count("ERROR:") == 2


def test_good_answers_print_the_next_commands(tmp_path):
    result = generate(tmp_path, {"project_name": "Vision Run", "nodes": "3"})
    assert result.returncode == 0, result.stderr
    assert "cd vision-run" in result.stdout
    assert "make build" in result.stdout and "make up" in result.stdout
    assert (tmp_path / "vision-run" / "vision_run" / "__init__.py").exists()
