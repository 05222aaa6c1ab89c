"""What users expect around the training job: pre-commit, template updates, dev container."""

import json
import shutil
import subprocess

from helpers import TEMPLATE, render, sh, tool


def git_repo(folder):
    sh(["git", "init", "-q", "-b", "main"], cwd=folder)
    sh(["git", "add", "-A"], cwd=folder)
    sh(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "init"],
        cwd=folder,
    )


def commit_all(folder, message):
    sh(["git", "add", "-A"], cwd=folder)
    sh(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-qm",
            message,
        ],
        cwd=folder,
    )


def template_copy(destination):
    """The template as committed plus the working tree's changes, without build outputs."""
    files = sh(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=TEMPLATE
    ).stdout.splitlines()
    for name in files:
        source = TEMPLATE / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    git_repo(destination)
    return destination


def pre_commit(folder):
    return sh([tool("pre-commit"), "run", "--all-files"], cwd=folder, check=False, timeout=900)


def test_pre_commit_passes_on_a_fresh_project(tmp_path):
    project = render(tmp_path)
    git_repo(project)
    result = pre_commit(project)
    assert result.returncode == 0, result.stdout[-4000:]
    for hook in ("ruff", "ruff format", "shellcheck", "hadolint", "yamllint"):
        assert f"\n{hook}." in "\n" + result.stdout, hook


def test_pre_commit_passes_on_the_template_itself(tmp_path):
    copy = template_copy(tmp_path / "template")
    result = pre_commit(copy)
    assert result.returncode == 0, result.stdout[-4000:]


def test_cruft_update_brings_a_template_change_into_a_fork(tmp_path):
    template = template_copy(tmp_path / "template")
    sh(
        [
            tool("cruft"),
            "create",
            "--no-input",
            "--output-dir",
            str(tmp_path / "out"),
            str(template),
        ],
        timeout=300,
    )
    project = tmp_path / "out" / "ddp-project"
    assert json.loads((project / ".cruft.json").read_text())["template"] == str(template)
    git_repo(project)

    readme = template / "{{cookiecutter.project}}" / "README.md"
    readme.write_text(readme.read_text() + "\nA fix from the template.\n")
    commit_all(template, "template fix")
    check = subprocess.run([tool("cruft"), "check"], cwd=project, capture_output=True, text=True)
    assert check.returncode != 0, "cruft must see that the fork is behind"
    sh(
        [tool("cruft"), "update", "--skip-apply-ask", "--allow-untracked-files"],
        cwd=project,
        timeout=300,
    )
    assert "A fix from the template." in (project / "README.md").read_text()
    assert subprocess.run([tool("cruft"), "check"], cwd=project).returncode == 0


def test_dev_container_uses_the_project_image(default_project):
    config = json.loads((default_project / ".devcontainer" / "devcontainer.json").read_text())
    assert config["image"] == f"{default_project.name}:latest"
    assert config["workspaceFolder"] == "/app"


def test_tensorboard_is_an_optional_service_on_loopback(default_project):
    def services(*extra):
        out = sh(
            [tool("docker-compose"), *extra, "config", "--format", "json"], cwd=default_project
        ).stdout
        return json.loads(out)["services"]

    assert "tensorboard" not in services()
    board = services("--profile", "tensorboard")["tensorboard"]
    assert board["ports"][0]["host_ip"] == "127.0.0.1"
    assert board["profiles"] == ["tensorboard"]
