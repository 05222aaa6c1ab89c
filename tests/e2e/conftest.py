"""Fixtures for the container tests: a reachable Docker Engine, the stand-in env image, and a
rendered project whose containers, network and image are removed afterwards.

The conda env stage of the generated Dockerfile is the one part replaced here: no registry or
conda channel is reachable from CI, so the runtime stage is built on `ddp-template-env:standin`
(scripts/standin-image.sh), and everything else runs for real.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TEMPLATE, render, sh

STANDIN_IMAGE = os.environ.get("STANDIN_IMAGE", "ddp-template-env:standin")


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(item.fspath).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def engine():
    # A missing engine fails the container tests: skipping them would hide the product's core.
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
    source = render(tmp_path_factory.mktemp("standin"), python_version="3.11")
    sh(
        [TEMPLATE / "scripts" / "standin-image.sh", source / "environment.yml", STANDIN_IMAGE],
        env={**os.environ, "PYTHON": sys.executable},
        timeout=1800,
    )
    return STANDIN_IMAGE


class Project:
    """A rendered project driven through its Makefile, as a user would."""

    def __init__(self, root, env_image):
        self.root = root
        self.name = root.name
        self.env_image = env_image

    def make(self, *args, check=True, timeout=600):
        return sh(
            ["make", *args, f"ENV_IMAGE={self.env_image}"],
            cwd=self.root,
            check=check,
            timeout=timeout,
        )

    def compose(self, *args, check=True, timeout=300, **env):
        return sh(
            ["docker", "compose", *args],
            cwd=self.root,
            check=check,
            timeout=timeout,
            env={**os.environ, "ENV_IMAGE": self.env_image, **env},
        )

    def run(self, service, *args, **env):
        """`docker compose run`, with the exit code read from the container (Compose 2.40 on
        Engine 20.10 returns 0 whatever the command did); returns (code, output)."""
        name = f"{self.name}-run-{os.getpid()}"
        result = self.compose(
            "run", "--name", name, "--no-deps", service, *args, check=False, **env
        )
        code = sh(["docker", "inspect", "-f", "{{.State.ExitCode}}", name]).stdout.strip()
        sh(["docker", "rm", name])
        return int(code), result.stdout + result.stderr

    def logs(self, service):
        return self.compose("logs", "--no-color", "--no-log-prefix", service).stdout

    def containers(self):
        out = sh(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}"]
        )
        return out.stdout.split()

    def networks(self):
        out = sh(
            [
                "docker",
                "network",
                "ls",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={self.name}",
            ]
        )
        return out.stdout.split()


@pytest.fixture(scope="module")
def project(standin, tmp_path_factory):
    """Defaults except Python 3.11 (the stand-in's Python), under a name of its own."""
    name = f"ddp-e2e-{os.getpid()}"
    root = render(tmp_path_factory.mktemp("e2e"), python_version="3.11", project=name)
    sh(["make", "dirs"], cwd=root)  # tests that call Compose directly need the host folders too
    p = Project(root, standin)
    yield p
    # Containers, network and every image of the project, the untagged ones of rebuilds too.
    p.make("clean", check=False)
