"""Fixtures shared by the template's tests.

Container tests: a reachable Docker Engine (missing is a failure, not a skip), the stand-in env
image, a built project (`project`) and a trained one (`trained`), each made once per session,
so that any test runs alone (`pytest path::test`). The conda env stage of the generated
Dockerfile is the one part replaced: no registry or conda channel is reachable from CI, so the
runtime stage is built on `ddp-template-env:standin` (scripts/standin-image.sh), and everything
else runs for real.

Markers follow the fixtures a test uses: `docker` for the engine, `slurm` for the Slurm cluster
(root and apt). `make test-host` leaves both out.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from helpers import TEMPLATE, Project, render, sh

STANDIN_IMAGE = os.environ.get("STANDIN_IMAGE", "ddp-template-env:standin")
MARKED_BY_FIXTURE = {"engine": "docker", "slurm": "slurm"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, marker in MARKED_BY_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def default_project(tmp_path_factory):
    return render(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="session")
def engine():
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.fail(
            "Docker Engine not reachable (run `make docker-start` as root):\n" + info.stderr
        )
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if compose.returncode != 0:
        pytest.fail("the Docker Compose v2 plugin is missing (run `make docker-start`)")


@pytest.fixture(scope="session")
def standin(engine, tmp_path_factory):
    """The stand-in env image, built from a rendered environment.yml (skipped if up to date)."""
    source = render(tmp_path_factory.mktemp("standin"))
    sh(
        [TEMPLATE / "scripts" / "standin-image.sh", source / "environment.yml", STANDIN_IMAGE],
        env={**os.environ, "PYTHON": sys.executable},
        timeout=1800,
    )
    return STANDIN_IMAGE


@pytest.fixture(scope="session")
def project(standin, tmp_path_factory):
    """Defaults except Python 3.11 (the stand-in's), under a name of its own, built; its
    containers, network and images are removed at the end of the session."""
    name = f"ddp-e2e-{os.getpid()}"
    root = render(tmp_path_factory.mktemp("e2e"), project=name)
    built = Project(root, standin)
    built.make("dirs")  # tests that call Compose directly need the host folders too
    built.make("build", timeout=900)
    yield built
    built.make("clean", check=False)


@dataclass
class Trained:
    project: Project
    output: str  # of `make up`
    node_logs: list  # logs/node-*.log that the job wrote
    metrics_lines: int  # lines the job added to logs/metrics.jsonl


@pytest.fixture(scope="session")
def trained(project):
    """The built project after `make up` of 3 epochs on 2 nodes, into checkpoints/trained."""
    logs = project.root / "logs"
    metrics = logs / "metrics.jsonl"
    before = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    started = time.time()
    result = project.make(
        "up", "ARGS=--epochs 3 --samples 1024 --checkpoint-dir /checkpoints/trained"
    )
    node_logs = sorted(p.name for p in logs.glob("node-*.log") if p.stat().st_mtime >= started)
    added = len(metrics.read_text().splitlines()) - before
    return Trained(project, result.stdout + result.stderr, node_logs, added)
