"""Rendering helpers shared by the template's tests."""

import shutil
from pathlib import Path

import pytest
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
    """Path of a linter that the dev requirements install: missing is a failure, not a skip."""
    path = shutil.which(name)
    assert path, f"{name} is not on PATH: install requirements-dev.txt (make venv)"
    return path


@pytest.fixture(scope="session")
def default_project(tmp_path_factory):
    return render(tmp_path_factory.mktemp("default"))
