"""Helpers shared by the template's tests: rendering, commands, and a rendered project driven
through its Makefile and Compose, as a user would."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parents[1]


def render(output_dir, **answers):
    """Render the template with `answers` over the defaults; return the project folder."""
    return Path(
        cookiecutter(
            str(TEMPLATE),
            no_input=True,
            output_dir=str(output_dir),
            extra_context={k: str(v) for k, v in answers.items()},
        )
    )


def tool(name):
    """Path of a tool that the dev requirements install: missing is a failure, not a skip."""
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: install requirements-dev.txt (make venv)"
    return path


def sh(args, cwd=None, timeout=600, check=True, **kwargs):
    """Run a command, capturing its output; with check, fail showing the output's tail."""
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(map(str, args))} exited {result.returncode}\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def record(**figures):
    """Merge measured figures into build/e2e-timings.json, for the closing notes and README."""
    path = TEMPLATE / "build" / "e2e-timings.json"
    path.parent.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(figures)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(figures)


def losses(text):
    """The loss of every epoch line in a job's output."""
    return [float(x) for x in re.findall(r"epoch \d+/\d+ loss ([0-9.]+)", text)]


def wait_until(check, timeout, what):
    """Poll `check` every second until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(1)
    return found


class Running:
    """A command running in the background whose merged output is read line by line."""

    def __init__(self, args, cwd):
        self.process = subprocess.Popen(
            args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines = []

    def read_until(self, pattern, timeout=180):
        """Read the output until a line matches `pattern`; the time it matched."""
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            self.lines.append(line)
            if re.search(pattern, line):
                return time.monotonic()
            assert time.monotonic() < deadline, "".join(self.lines[-50:])
        raise AssertionError(f"never saw {pattern!r}:\n" + "".join(self.lines[-50:]))

    def finish(self, timeout=300):
        """Wait for the end; all of the output."""
        out, _ = self.process.communicate(timeout=timeout)
        self.lines.append(out)
        return "".join(self.lines)

    @property
    def returncode(self):
        return self.process.returncode


class Project:
    """A rendered project driven through its Makefile and Compose."""

    def __init__(self, root, env_image):
        self.root = root
        self.name = root.name
        self.env_image = env_image

    def make(self, *args, check=True, timeout=600):
        # Under `make test` a make run by a test would add "Entering directory" lines.
        return sh(
            ["make", "--no-print-directory", *args, f"ENV_IMAGE={self.env_image}"],
            cwd=self.root,
            check=check,
            timeout=timeout,
        )

    def start_up(self, *args):
        """`make up` in the background."""
        return Running(["make", "up", f"ENV_IMAGE={self.env_image}", *args], self.root)

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

    def exit_codes(self):
        """`service code` of every container of the project, sorted."""
        listed = self.compose("ps", "--all", "--format", "{{.Service}} {{.ExitCode}}").stdout
        return sorted(listed.splitlines())

    def kill_during_training(self, container, *args, epoch=1):
        """`make up` with `args`, and `docker kill` of a container (None: the node holding rank
        0) once epoch `epoch` is logged; returns the running `make up`, the time of the kill and
        the container's name."""
        job = self.start_up(*args)
        job.read_until(rf"epoch {epoch}/\d+")
        name = self.holding_rank_0() if container is None else f"{self.name}-{container}"
        sh(["docker", "kill", name])
        return job, time.monotonic(), name

    def holding_rank_0(self):
        """The name of the running node container whose rank 0 logged last, found by the
        project's own `tools/chaos.py` (what `make chaos` aims at)."""
        nodes = self.compose("ps", "--status", "running", "--format", "{{.Name}}", "node")
        spec = importlib.util.spec_from_file_location("chaos", self.root / "tools" / "chaos.py")
        chaos = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(chaos)
        holder = chaos.holding_rank_0(nodes.stdout.split())
        assert holder, "no running node logged as rank 0"
        return holder

    def containers(self):
        return self._labelled(["docker", "ps", "-aq"])

    def networks(self):
        return self._labelled(["docker", "network", "ls", "-q"])

    def _labelled(self, command):
        label = f"label=com.docker.compose.project={self.name}"
        return sh([*command, "--filter", label]).stdout.split()
