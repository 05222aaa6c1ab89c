"""Rendering helpers shared by the template's tests."""

import json
import shutil
import subprocess
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
