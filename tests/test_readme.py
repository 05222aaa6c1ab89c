"""Both READMEs as a reader meets them: within their line budget, naming only commands, knobs and
files that exist, and no text about a feature the render leaves out (GPUs in a CPU render,
other engines without cluster_engines). The generated docs/ are held to the same."""

import re
from pathlib import Path

import pytest

from helpers import TEMPLATE, render

BUDGET = 160  # lines: "about 150" for each README

RENDERS = {
    "default": {},
    "gpu": {"gpu": "yes"},
    "no-engines": {"cluster_engines": "no"},
    "gpu-no-engines": {"gpu": "cu126", "cluster_engines": "no"},
}

# Words that belong to a feature: they must not appear where the render does not have it.
GPU_WORDS = ("compose.gpu.yaml", "gpu-check", "## GPUs", "nvidia.com/gpu", "`GPUS`", "--nv")
ENGINE_WORDS = (
    "Kubernetes",
    "Kubeflow",
    "Slurm",
    "sbatch",
    "Swarm",
    "up-node",
    "k8s",
    "engines.md",
)


def code_spans(text):
    """What the text shows as code: `inline` spans and fenced blocks, line by line."""
    fenced = re.findall(r"^```.*?\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    outside = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return [line for block in fenced for line in block.splitlines()] + re.findall(
        r"`([^`\n]+)`", outside
    )


def make_commands(text):
    """The targets of every `make TARGET...` the text shows as code (`make logs rendezvous` names
    two: make would take the second for a target too)."""
    targets = set()
    for span in code_spans(text):
        for rest in re.findall(r"(?:^|[;&|(:]\s*|\s)make (.*)", span):
            for word in rest.split():
                bare = word.rstrip("),;")
                if not re.fullmatch(r"[a-z][a-z0-9-]*", bare):
                    break
                targets.add(bare)
                if bare != word:  # the command ends there
                    break
    return targets


def makefile_targets(makefile):
    return set(re.findall(r"^([a-z][a-z0-9-]*):(?!=)", makefile.read_text(), re.MULTILINE))


def capital_names(text):
    """Names in capitals the text shows as code: `NODES`, `make up NODES=4`, `$HEALTH_FILE`."""
    return {
        name
        for span in code_spans(text)
        for name in re.findall(r"(?<![\w.-])([A-Z][A-Z0-9]*_[A-Z0-9_]+|[A-Z]{4,})(?![\w.(-])", span)
    }


# Capitals the docs show that no code of the project reads: torchrun's environment contract and
# the variables gloo, NCCL and Compose read themselves, a Python name, make up's verdicts.
NOT_SETTINGS = {
    *("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
    *("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "COMPOSE_FILE"),
    *("KNOBS", "FAILED", "STOPPED"),
}


def read(name):
    """How code reads a setting: "NAME" (Python, JSON), $NAME or ${NAME...} (shell, Compose),
    $(NAME) (make), or ${NAME} in a manifest."""
    return rf"[\"']{name}[\"']|\$\{{?{name}\b|\$\({name}\)"


def docs_of(root):
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@pytest.fixture(scope="module", params=RENDERS, ids=list(RENDERS))
def rendered(request, tmp_path_factory):
    answers = RENDERS[request.param]
    return render(tmp_path_factory.mktemp(request.param), **answers), answers


def test_the_generated_readme_is_within_its_budget_and_starts_with_what_a_user_needs(rendered):
    root, _ = rendered
    text = (root / "README.md").read_text()
    assert len(text.splitlines()) <= BUDGET
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings[:3] == ["Quick start", "Bring your own model", "Commands"], headings
    assert headings[-1] == "How it works", headings
    # No history: a user's guide says what is, not what was.
    for word in ("it was ", "used to ", "before issue", "issue 1", "issue 2"):
        assert word not in text, word


def test_readme_and_docs_name_only_commands_the_makefile_has(rendered):
    root, _ = rendered
    targets = makefile_targets(root / "Makefile")
    assert {"up", "build", "test", "scale"} <= make_commands((root / "README.md").read_text())
    for doc in docs_of(root):
        named = make_commands(doc.read_text())
        assert named <= targets, f"{doc.name} names {sorted(named - targets)}"


def test_readme_and_docs_name_only_settings_the_project_has(rendered):
    root, _ = rendered
    # Code that reads a setting: not its comments, the tests, or .env, which only sets them.
    code = "\n".join(
        re.sub(r"(^|\s)#.*$", "", path.read_text(errors="replace"), flags=re.MULTILINE)
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix != ".md"
        and path.name != ".env"
        and not {"docs", "tests", ".git"} & set(path.parts)
    )
    for doc in docs_of(root):
        named = capital_names(doc.read_text()) - NOT_SETTINGS
        unknown = {name for name in named if not re.search(read(name), code)}
        assert not unknown, f"{doc.name} names settings nothing in the project reads: {unknown}"


def test_every_link_of_readme_and_docs_reaches_a_file_of_the_render(rendered):
    root, _ = rendered
    for doc in docs_of(root):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}"


def test_no_text_about_a_feature_the_render_leaves_out(rendered):
    root, answers = rendered
    words = []
    if answers.get("gpu", "no") == "no":
        words += GPU_WORDS
    if answers.get("cluster_engines", "yes") == "no":
        words += ENGINE_WORDS
        assert not (root / "docs" / "engines.md").exists()
    for doc in docs_of(root):
        text = doc.read_text()
        found = [word for word in words if word in text]
        assert not found, f"{doc.name} speaks of {found}, which this render does not have"


def test_a_gpu_render_with_engines_says_how_gpus_and_engines_work(tmp_path):
    root = render(tmp_path, gpu="yes")
    readme = (root / "README.md").read_text()
    for word in ("## GPUs", "## Beyond one host", "make gpu-check", "docs/engines.md"):
        assert word in readme, word


def test_the_template_readme_is_within_its_budget_and_names_what_exists(tmp_path):
    text = (TEMPLATE / "README.md").read_text()
    assert len(text.splitlines()) <= BUDGET
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == [
        "What it generates",
        "Questions (cookiecutter.json)",
        "Testing the template",
        "Contributing",
    ]
    named = make_commands(text)
    assert {"test", "test-host", "lint"} <= named
    # Its own commands, and those of the repository it generates.
    targets = makefile_targets(TEMPLATE / "Makefile") | makefile_targets(
        render(tmp_path) / "Makefile"
    )
    assert named <= targets, sorted(named - targets)
    for path in ("CONTRIBUTING.md", "bench/README.md", ".ci/run"):
        assert path in text and (TEMPLATE / path).exists(), path
    # The test command CI runs is the one README names.
    assert "make test" in (TEMPLATE / ".ci" / "run").read_text()


def test_the_template_readme_lists_every_question_with_its_default():
    import json

    answers = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    text = (TEMPLATE / "README.md").read_text()
    table = text.split("## Questions", 1)[1].split("\n## ", 1)[0]
    rows = {
        name: row.split("|")[2].strip()
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    asked = [name for name in answers if not name.startswith("_")]
    assert sorted(rows) == sorted(asked)
    for name, value in answers.items():
        if isinstance(value, list):  # a choice: its first entry is the default
            assert rows[name].startswith(value[0]), (name, rows[name])


def test_the_tree_in_the_template_readme_is_what_a_default_render_holds(tmp_path):
    root = render(tmp_path)
    text = (TEMPLATE / "README.md").read_text()
    tree = text.split("## What it generates", 1)[1].split("```")[1]
    for line in tree.splitlines()[2:]:
        for path in line.split("  ")[0].strip().split():
            assert (root / path).exists(), path


def test_the_benchmark_figures_live_in_bench_readme():
    assert "| figure | value | target |" in (TEMPLATE / "bench" / "README.md").read_text()
    assert "| figure |" not in (TEMPLATE / "README.md").read_text()
    assert Path(TEMPLATE / "CONTRIBUTING.md").read_text().count("## ") >= 3
