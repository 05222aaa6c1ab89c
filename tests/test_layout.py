"""The generated repository's three parts, as a newcomer meets them: the task a fork edits beside
the loop, the training machinery, the launcher; train() on one screen; each exit code defined
once; torch's private API touched in one module."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import render

PARTS = {"cpu": {}, "gpu": {"gpu": "yes"}}
# torch's private names: an attribute, or a module of torch's, that starts with an underscore.
PRIVATE = re.compile(r"\.(_[a-z]\w*)|\btorch(?:\.\w+)*\._\w+")


@pytest.fixture(scope="module", params=list(PARTS), ids=list(PARTS))
def root(request, tmp_path_factory):
    return render(tmp_path_factory.mktemp(request.param), **PARTS[request.param])


def python_files(root, *folders):
    return sorted(p for folder in folders for p in (root / folder).rglob("*.py"))


def test_the_task_a_fork_edits_sits_beside_the_loop_and_the_env_names_it(root):
    assert (root / "task.py").is_file() and (root / "train_dist.py").is_file()
    package = root / "ddp_project"
    assert not (package / "task.py").exists() and not (package / "tasks.py").exists()
    assert "\nTASK=task.py\n" in (root / ".env").read_text()
    # The machinery's module names say their job; none is one letter from another.
    names = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not (len(a) == len(b) + 1 and a.startswith(b)), (a, b)
    assert {"errors", "folders", "task_loader", "dealing", "sample_log"} <= set(names)


def test_the_launcher_is_a_package_every_engine_runs_and_docker_holds_no_python(root):
    assert not list((root / "docker").rglob("*.py"))
    assert {p.name for p in (root / "launcher").glob("*.py")} == {
        "__init__.py",
        "__main__.py",
        "node.py",
        "settings.py",
        "patches.py",
        "rendezvous.py",
        "roll.py",
    }
    assert 'CMD ["python", "-m", "launcher"]' in (root / "Dockerfile").read_text()
    makefile = (root / "Makefile").read_text()
    assert "$(PYTHON) -m launcher" in makefile and "docker/launch" not in makefile
    sbatch = (root / "slurm" / "train.sbatch").read_text()
    assert "python -m launcher.rendezvous &" in sbatch
    assert "exec python -m launcher' || status=$?" in sbatch
    # Ordinary imports: no file loaded by path, no sys.path edits to reach a sibling.
    for path in python_files(root, "launcher"):
        text = path.read_text()
        assert "spec_from_file_location" not in text and "sys.path.insert" not in text, path


def test_the_launcher_runs_from_the_project_folder_as_python_dash_m(root):
    """`python -m launcher` in a folder without .env (as in an image) and without knobs is
    refused in one line: the package, and the exit codes it shares with the loop, import as
    they are."""
    copy = root.parent / f"{root.name}-without-env"
    if not copy.exists():
        shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".env"))
    result = subprocess.run(
        [sys.executable, "-m", "launcher"],
        cwd=copy,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    expected = "ERROR: SCRIPT is not set: pass it to every node, or run beside the project's .env"
    assert result.stderr.splitlines() == [expected], result.stderr


def test_train_fits_on_one_screen(root):
    tree = ast.parse((root / "train_dist.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    following = tree.body[tree.body.index(train) + 1]
    # From `def train` to the next definition, comments and blank lines included.
    assert following.lineno - train.lineno <= 60, following.lineno - train.lineno
    nested = [n.name for n in ast.walk(train) if isinstance(n, ast.FunctionDef) and n is not train]
    assert not nested, f"train() defines {nested}: a reader should see the loop's body"


def test_each_exit_code_is_defined_once_and_imported_where_used(root):
    defined = {}
    for path in python_files(root, "ddp_project", "launcher", "."):
        if "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in (
                        "USAGE_ERROR",
                        "PEER_STOPPED",
                    ):
                        defined.setdefault(target.id, set()).add(path.relative_to(root).as_posix())
    assert defined == {
        "USAGE_ERROR": {"ddp_project/errors.py"},
        "PEER_STOPPED": {"ddp_project/errors.py"},
    }


def private_names(tree):
    """Underscore attributes of objects other than self, cls and os, and imports of underscore
    modules or names: what a module reaches into that is not public."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and re.match(r"_[^_]", node.attr):
            # os._exit is Python's public way out without teardown.
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os")):
                yield node.attr
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if re.search(r"(^|\.)_[^_]", a.name))
        elif isinstance(node, ast.ImportFrom):
            if re.search(r"(^|\.)_[^_]", node.module or ""):
                yield node.module
            yield from (a.name for a in node.names if re.match(r"_[^_]", a.name))


def test_torchs_private_api_is_touched_in_launcher_patches_alone(root):
    """Every private name of torch's that the project reaches is in launcher/patches.py, where
    each patch says why; the one import of a private module kept elsewhere is named here."""
    patches = set(private_names(ast.parse((root / "launcher" / "patches.py").read_text())))
    assert {"_state_holder", "_RendezvousJoinOp", "_remaining_restarts"} <= patches
    allowed = {"ddp_project/distributed.py": {"torch.distributed._shard"}}
    found = {}
    folders = ("ddp_project", "launcher", "examples", "k8s", "swarm", "tools")
    for path in python_files(root, *folders):
        relative = path.relative_to(root).as_posix()
        if relative == "launcher/patches.py":
            continue
        names = set(private_names(ast.parse(path.read_text()))) - allowed.get(relative, set())
        if names:
            found[relative] = sorted(names)
    names = set(private_names(ast.parse((root / "train_dist.py").read_text())))
    assert not found and not names, (found, names)
