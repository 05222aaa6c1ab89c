"""Every meaningful answer combination renders a project that passes its linters."""

import importlib.util
import json
import os
import re
import stat
import subprocess

import pytest
import yaml

from helpers import TEMPLATE, render, sh, tool

# The supported combinations, one per axis that changes what is rendered.
COMBINATIONS = {
    "default": {},
    "py310": {"python_version": "3.10"},
    "py312-4-nodes": {"python_version": "3.12", "nodes": 4},
    "one-node": {"nodes": 1},
    "gpu": {"gpu": "yes"},  # what scripts written before the CUDA choices pass: cu128
    "gpu-cu126-no-mirror": {"gpu": "cu126", "mirror": "none"},
    "no-mirror": {"mirror": "none"},
    "miniforge": {"conda": "miniforge"},
    "miniconda-anaconda": {"conda": "miniconda-anaconda"},
    "no-cluster-files": {"cluster_engines": "no"},
    "custom-limits": {
        "cpus_per_node": "0.5",
        "memory_per_node": "1536M",
        "shm_size": "256m",
        "uid": 1234,
        "gid": 2345,
        "project_name": "My Fancy Trainer",
    },
}


def gpu_on(answers):
    return answers.get("gpu", "no") != "no"


def cuda(answers):
    """The CUDA flavour of torch's wheels for a gpu answer (yes: the default, cu128)."""
    return {"no": "cpu", "yes": "cu128"}.get(answers.get("gpu", "no"), answers.get("gpu"))


LEFTOVER = re.compile(r"\{\{-?\s*cookiecutter|\{%|cookiecutter\.(?!json)")


@pytest.fixture(scope="module", params=list(COMBINATIONS), ids=list(COMBINATIONS))
def project(request, tmp_path_factory):
    answers = COMBINATIONS[request.param]
    return answers, render(tmp_path_factory.mktemp(request.param), **answers)


def run(args, cwd, **kwargs):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs)


def files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_template_syntax_survives(project):
    _, root = project
    for path in files(root):
        text = path.read_text()
        assert not LEFTOVER.search(text), f"{path.relative_to(root)}: {LEFTOVER.search(text)}"
    assert not [
        p for p in root.rglob("*") if "cookiecutter" in p.name and p.name != ".cookiecutter.json"
    ]


def test_hadolint(project):
    _, root = project
    result = run([tool("hadolint"), "Dockerfile"], root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck(project):
    answers, root = project
    scripts = sorted(str(p) for p in [*root.rglob("*.sh"), *root.rglob("*.sbatch")])
    # The launch path is Python (python -m launcher); the shell files are the healthcheck and the
    # Slurm batch script.
    assert len(scripts) == 1 + (answers.get("cluster_engines", "yes") == "yes")
    if scripts:
        result = run([tool("shellcheck"), *scripts], root)
        assert result.returncode == 0, result.stdout


def test_yamllint(project):
    _, root = project
    result = run([tool("yamllint"), "--strict", "."], root)
    assert result.returncode == 0, result.stdout


def test_ruff(project):
    _, root = project
    ruff = tool("ruff")
    lint = run([ruff, "check", "."], root)
    assert lint.returncode == 0, lint.stdout
    fmt = run([ruff, "format", "--check", "."], root)
    assert fmt.returncode == 0, fmt.stdout


def compose_config(root, *extra, env=None):
    result = run(
        [tool("docker-compose"), "config", "--format", "json", *extra],
        root,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_config_carries_the_answers(project):
    answers, root = project
    config = compose_config(root)
    node, store = config["services"]["node"], config["services"]["rendezvous"]
    assert set(config["services"]) == {"node", "rendezvous"}  # no master, no worker
    # GPU renders default to no CPU or memory limit (a GPU job needs the host's cores).
    cpus = float(answers.get("cpus_per_node", "0" if gpu_on(answers) else "1.0"))
    limits = node["deploy"]["resources"]["limits"]
    assert float(limits.get("cpus", 0)) == cpus
    assert ("memory" in limits) is (not gpu_on(answers) or "memory_per_node" in answers)
    assert int(node["shm_size"]) > 64 * 2**20
    assert node["environment"]["RDZV_ADDR"] == "rendezvous" == store["hostname"]
    assert "MASTER_ADDR" not in node["environment"]  # torchrun sets it: rank 0's node, any node
    assert node["environment"]["NODES"] == str(answers.get("nodes", 1 if gpu_on(answers) else 2))
    for service in (node, store):
        assert service["networks"] == {"ddp": None}
        assert "no-new-privileges:true" in service["security_opt"]
    volumes = {v["target"]: v for v in node["volumes"]}
    # The code is the image's: no bind mount of the project folder (its .git, .env, keys).
    assert set(volumes) == {"/data", "/checkpoints", "/logs", "/cache"}
    assert volumes["/data"]["read_only"]
    # The store trains nothing: no data, checkpoints, logs or GPU.
    assert "volumes" not in store
    assert node["init"] is True and store["init"] is True
    assert store["command"] == ["python", "-m", "launcher.rendezvous"]
    assert store["restart"] == "no" and store["healthcheck"]["test"][0] == "CMD"
    assert "reservations" not in store["deploy"]["resources"]
    # Nodes wait for the service themselves; without depends_on, Compose stops all at once.
    assert "depends_on" not in node
    assert "build" in node and "build" not in store
    assert config["name"] == root.name
    gpu = node["deploy"]["resources"].get("reservations")
    if gpu_on(answers):
        assert gpu["devices"][0]["driver"] == "nvidia"
        assert gpu["devices"][0]["capabilities"] == ["gpu"]
        assert gpu["devices"][0]["count"] == -1  # "all"
        assert node["environment"]["NCCL_SOCKET_IFNAME"] == "eth0"
        assert node["environment"]["DDP_BACKEND"] == "nccl"
        assert node["ulimits"]["memlock"] == -1
    else:
        assert gpu is None


def test_caches_live_in_a_mounted_folder_that_git_and_the_image_leave_out(
    default_project, tmp_path
):
    root = default_project
    volumes = {v["target"]: v for v in compose_config(root)["services"]["node"]["volumes"]}
    assert volumes["/cache"]["source"] == str(root / "cache")
    assert not volumes["/cache"].get("read_only")
    dockerfile = (root / "Dockerfile").read_text()
    assert "TORCH_HOME=/cache/torch" in dockerfile and "HF_HOME=/cache/huggingface" in dockerfile
    (tmp_path / ".gitignore").write_text((root / ".gitignore").read_text())
    run(["git", "init", "-q"], tmp_path)
    ignored = run(["git", "check-ignore", "--no-index", "cache/torch/weights.pth"], tmp_path)
    assert ignored.returncode == 0, ignored.stderr
    assert "cache" in (root / ".dockerignore").read_text().split()


def test_memory_limit_and_shm_are_the_answers(tmp_path):
    root = render(tmp_path, memory_per_node="1536M", shm_size="256m")
    node = compose_config(root)["services"]["node"]
    assert node["deploy"]["resources"]["limits"]["memory"] == str(1536 * 2**20)
    assert node["shm_size"] == str(256 * 2**20)


def test_proxy_settings_reach_the_build(default_project):
    config = compose_config(default_project, env={"HTTPS_PROXY": "http://proxy.invalid:3128"})
    assert config["services"]["node"]["build"]["args"]["HTTPS_PROXY"] == (
        "http://proxy.invalid:3128"
    )


def test_github_workflow_is_valid(project):
    answers, root = project
    workflow = root / ".github" / "workflows" / "ci.yml"
    result = run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow)],
        root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = yaml.safe_load(workflow.read_text())["jobs"]
    assert set(jobs) == {"lint", "host-tests", "docker"}
    steps = " ".join(step.get("run", "") for step in jobs["docker"]["steps"])
    assert "make build" in steps and "make up NODES=2" in steps
    assert ("DDP_BACKEND=gloo" in steps) == gpu_on(answers)


def test_env_and_environment_yml(project):
    answers, root = project
    env = env_settings(root)
    gpu = gpu_on(answers)
    # GPU renders: one node with a process per GPU (README, "GPUs").
    assert env["NODES"] == str(answers.get("nodes", 1 if gpu_on(answers) else 2))
    assert env["NPROC_PER_NODE"] == ("gpu" if gpu_on(answers) else "1")
    assert env["DDP_BACKEND"] == ("nccl" if gpu else "gloo")
    assert env["APP_UID"] == str(answers.get("uid", ""))  # empty: the user who builds
    assert ("COMPOSE_FILE" in env) == gpu
    assert (root / "compose.gpu.yaml").exists() == gpu

    conda_env = yaml.safe_load((root / "environment.yml").read_text())
    deps = conda_env["dependencies"]
    assert f"python={answers.get('python_version', '3.11')}" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip[0].endswith(f"/whl/{cuda(answers)}")
    defaults = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    assert f"torch=={defaults['torch_version']}" in pip
    assert f"torchvision=={defaults['torchvision_version']}" in pip
    anaconda = answers.get("conda") == "miniconda-anaconda"
    assert conda_env["channels"] == (["defaults"] if anaconda else ["conda-forge", "nodefaults"])


def test_dockerfile_follows_the_answers(project):
    answers, root = project
    dockerfile = (root / "Dockerfile").read_text()
    tuna = answers.get("mirror", "tuna") == "tuna"
    assert "COPY docker/condarc /opt/conda/.condarc" in dockerfile
    assert ("COPY docker/pip.conf" in dockerfile) == tuna
    assert (root / "docker" / "pip.conf").exists() == tuna
    if tuna:
        assert "pypi.tuna.tsinghua.edu.cn" in (root / "docker" / "pip.conf").read_text()
    anaconda = answers.get("conda") == "miniconda-anaconda"
    assert ("conda tos accept" in dockerfile) == anaconda
    base = "miniforge3" if answers.get("conda") == "miniforge" else "miniconda3"
    assert re.search(rf"ARG CONDA_IMAGE=\S+/{base}:\S+", dockerfile)
    assert "ARG ENV_IMAGE=env" in dockerfile and "FROM ${ENV_IMAGE} AS runtime" in dockerfile
    assert 'ENTRYPOINT []\nCMD ["python", "-m", "launcher"]' in dockerfile
    assert "USER ${APP_UID}:${APP_GID}" in dockerfile
    assert "conda run" not in dockerfile.replace("not `conda run`", "")


def test_scripts_are_executable(project):
    _, root = project
    for script in (root / "slurm").glob("*.sbatch"):
        assert script.stat().st_mode & stat.S_IXUSR, script


def test_cluster_files_follow_the_answer(project):
    answers, root = project
    wanted = answers.get("cluster_engines", "yes") == "yes"
    for path in ("k8s/pytorchjob.yaml", "k8s/job.yaml", "slurm/train.sbatch"):
        assert (root / path).exists() == wanted, path
    assert ("k8s-manifests:" in (root / "Makefile").read_text()) == wanted


def test_answers_are_saved_for_template_updates(project):
    answers, root = project
    saved = json.loads((root / ".cookiecutter.json").read_text())
    for key, value in answers.items():
        assert saved[key] == str(value)
    assert "_template" in saved and "_output_dir" not in saved


def test_gitattributes_keeps_lf(default_project):
    assert "eol=lf" in (default_project / ".gitattributes").read_text()


def test_make_help_is_the_default_and_lists_the_commands(default_project):
    # No "Entering directory" lines when this suite itself runs under make (make test).
    result = run(["make", "--no-print-directory"], default_project)
    assert result.returncode == 0, result.stderr
    for target in (
        "build",
        "up",
        "down",
        "logs",
        "ps",
        "shell",
        "test",
        "lint",
        "train-local",
        "clean",
    ):
        assert re.search(rf"^\s+{target}\s+\S", result.stdout, re.MULTILINE), target
    # In groups, everyday commands first; every documented target in one of them.
    groups = {
        block.splitlines()[0]: re.findall(r"^  (\S+)", block, re.MULTILINE)
        for block in result.stdout.strip().split("\n\n")
    }
    assert list(groups) == [
        "Everyday",
        "Elastic, checks and the host",
        "Other engines (docs/engines.md)",
    ]
    assert {"build", "up", "down", "logs", "test", "plot"} <= set(groups["Everyday"])
    assert {"scale", "chaos", "samples-report"} <= set(groups["Elastic, checks and the host"])
    assert {"up-node", "swarm-up", "k8s-manifests"} <= set(
        groups["Other engines (docs/engines.md)"]
    )
    documented = re.findall(
        r"^([a-z0-9-]+):.*## ", (default_project / "Makefile").read_text(), re.M
    )
    assert sorted(documented) == sorted(sum(groups.values(), []))


@pytest.mark.parametrize(
    "override, message",
    [
        ("NODES=0", "NODES must be a whole number >= 1, got '0'"),
        ("NODES=two", "NODES must be a whole number >= 1, got 'two'"),
        ("CPUS=lots", "CPUS must be a number such as 1.0, got 'lots'"),
        ("MEMORY=2X", "MEMORY must be a size such as 2G, got '2X'"),
        ("SCRIPT=missing.py", "SCRIPT 'missing.py' not found"),
    ],
)
def test_make_refuses_bad_settings(default_project, override, message):
    result = run(["make", "check", override], default_project)
    assert result.returncode != 0
    assert message in result.stderr


def test_blank_lines_between_blocks_survive_rendering(project):
    """A `{%-` before a block eats the blank line above it: a Makefile rule or a README heading
    then runs into the text before it."""
    _, root = project
    makefile = (root / "Makefile").read_text().splitlines()
    for i, line in enumerate(makefile):
        if re.match(r"^[a-z][a-z0-9-]*:", line) and i > 0:
            above = makefile[i - 1]
            assert above == "" or above.startswith("#"), f"Makefile: {above!r} runs into {line!r}"
    readme = (root / "README.md").read_text().split("```")[::2]  # outside code blocks
    for part in readme:
        lines = part.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("#") and i > 0:
                assert lines[i - 1] == "", f"README: {lines[i - 1]!r} runs into {line!r}"
    assert "\n\n\n" not in (root / "Makefile").read_text() + (root / "README.md").read_text()


def env_settings(root):
    return dict(
        line.split("=", 1)
        for line in (root / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )


def knobs_table(root):
    """The variables of the README's knobs table."""
    readme = (root / "README.md").read_text()
    knobs = readme.split("## Knobs", 1)[1].split("\n## ", 1)[0]
    table = next(block for block in knobs.split("\n\n") if block.startswith("| variable"))
    return [
        name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])
    ]


# A value other than the default for every knob: each must change what Compose runs.
OTHER_VALUES = {
    "NODES": "5",
    "NPROC_PER_NODE": "3",
    "SCRIPT": "own.py",
    "ARGS": "--epochs 9",
    "TASK": "examples/charlm.py",
    "CPUS": "0.25",
    "MEMORY": "3G",
    "SHM_SIZE": "512m",
    "RDZV_PORT": "29411",
    "WAIT_TIMEOUT": "61",
    "REJOIN_TIMEOUT": "11",
    "HEARTBEAT_INTERVAL": "2",
    "HEARTBEAT_MISSES": "4",
    "JOIN_TIMEOUT": "121",
    "LAST_CALL_TIMEOUT": "2",
    "RDZV_TIMEOUT": "31",
    "HEALTH_TIMEOUT": "301",
    "START_METHOD": "thread",
    "MIN_NODES": "2",
    "MAX_NODES": "6",
    "MAX_RESTARTS": "7",
    "RESTART_POLICY": "no",
    "DDP_BACKEND": "mpi",
    "GPUS": "1",
    "COMPOSE_FILE": "compose.yaml",
    "COMPOSE_PROJECT_NAME": "another-name",
    "IMAGE": "another:tag",
    "CONDA_IMAGE": "another/conda:1",
    "ENV_IMAGE": "another-env:1",
    "APP_UID": "1234",
    "APP_GID": "2345",
}


@pytest.mark.parametrize("answers", [{}, {"gpu": "yes"}], ids=["cpu", "gpu"])
def test_every_knob_in_the_readme_reaches_the_containers(tmp_path, answers):
    root = render(tmp_path, **answers)
    knobs = knobs_table(root)
    assert sorted(knobs) == sorted(env_settings(root)), "README's knobs table and .env differ"
    unset = {name: "" for name in OTHER_VALUES if name in os.environ}  # the shell's own
    default = compose_config(root, env=unset)
    for name in knobs:
        changed = compose_config(root, env={**unset, name: OTHER_VALUES[name]})
        assert changed != default, f"{name} does not reach the containers"


@pytest.mark.parametrize("answers", [{}, {"gpu": "yes"}], ids=["cpu", "gpu"])
def test_every_engine_takes_the_launchers_knobs_from_dot_env_alone(tmp_path, answers):
    root = render(tmp_path, **answers)
    spec = importlib.util.spec_from_file_location("settings", root / "launcher" / "settings.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)  # no torch at import: the node imports it later
    env = env_settings(root)
    assert not hasattr(launch, "DEFAULTS")
    assert set(launch.KNOBS) <= set(env), "a launcher knob has no default in .env"
    assert not set(launch.ENGINE) & set(env), "an engine's own setting has a second default"
    # Compose passes every knob with .env's value.
    unset = {name: "" for name in OTHER_VALUES if name in os.environ}
    node = compose_config(root, env=unset)["services"]["node"]["environment"]
    assert {name: node[name] for name in launch.KNOBS} == {name: env[name] for name in launch.KNOBS}
    # Kubernetes: every pod reads them from one ConfigMap, written from .env.
    image = ["IMAGE=r.example.com/x:1", "NPROC_PER_NODE=2"] if gpu_on(answers) else ["IMAGE=r/x:1"]
    sh(["make", "k8s-manifests", *image], cwd=root, env={**os.environ, **unset})
    settings = yaml.safe_load((root / "build" / "k8s" / "settings.yaml").read_text())
    assert settings["kind"] == "ConfigMap"
    overridden = {"NPROC_PER_NODE": "2"} if gpu_on(answers) else {}
    assert settings["data"] == {name: env[name] for name in launch.KNOBS} | overridden
    # Slurm sets only what the allocation decides; the launcher reads .env for the rest.
    sbatch = (root / "slurm" / "train.sbatch").read_text()
    exported = re.search(r"^export (.+)$", sbatch, re.MULTILINE).group(1).split()
    assert set(exported) == {"RDZV_ADDR", "NODES", "MIN_NODES", "RUN_ID"}
    assert launch.ENV_FILE == root / ".env"


ANACONDA_HOSTS = ("repo.anaconda.com", "anaconda/pkgs", "defaults")


@pytest.mark.parametrize("mirror", ["tuna", "none"])
@pytest.mark.parametrize("conda", ["miniconda", "miniforge", "miniconda-anaconda"])
def test_the_env_stage_uses_only_the_projects_channels(tmp_path, conda, mirror):
    """conda's terms-of-service plugin checks the channels of the configuration, not of
    environment.yml: the env stage replaces the base image's .condarc with the project's."""
    root = render(tmp_path, conda=conda, mirror=mirror)
    text = (root / "docker" / "condarc").read_text()
    condarc = yaml.safe_load(text)
    dockerfile = (root / "Dockerfile").read_text()
    copy = dockerfile.index("COPY docker/condarc /opt/conda/.condarc")
    assert copy < dockerfile.index("RUN conda env create")
    mirrored = [url for value in condarc.values() for url in re.findall(r"https://\S+", str(value))]
    if mirror == "tuna":
        assert mirrored and all(
            url.startswith("https://mirrors.tuna.tsinghua.edu.cn/") for url in mirrored
        )
    else:
        assert not mirrored
    if conda == "miniconda-anaconda":
        assert condarc["channels"] == ["defaults"]
        assert (
            copy < dockerfile.index("RUN conda tos accept") < dockerfile.index("conda env create")
        )
    else:
        assert condarc["channels"] == ["conda-forge"]
        lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not any(host in line for line in lines for host in ANACONDA_HOSTS), text
        assert "conda tos" not in dockerfile


def test_the_default_project_uses_tunas_mirrors_for_conda_and_pip(default_project):
    assert (
        "https://mirrors.tuna.tsinghua.edu.cn/"
        in (default_project / "docker" / "condarc").read_text()
    )
    pip_conf = (default_project / "docker" / "pip.conf").read_text()
    assert "index-url = https://pypi.tuna.tsinghua.edu.cn/simple" in pip_conf


def test_at_most_16_questions_each_with_a_prompt():
    spec = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    questions = [key for key in spec if not key.startswith("_")]
    assert len(questions) <= 16, questions
    prompts = spec["__prompts__"]
    assert sorted(prompts) == sorted(questions)
    assert all(prompts[key].strip() and prompts[key] != key for key in questions)


def test_no_combination_of_the_choices_is_refused(tmp_path):
    """Each choice question's answers, with every answer of the others that interact."""
    spec = json.loads((TEMPLATE / "cookiecutter.json").read_text())
    for gpu in spec["gpu"]:
        for conda in spec["conda"]:
            for mirror in spec["mirror"]:
                out = tmp_path / f"{gpu}-{conda}-{mirror}"
                root = render(out, gpu=gpu, conda=conda, mirror=mirror)
                assert (root / "Dockerfile").exists()


def container_user(folder, *make_args, run_as=()):
    """The ids `make dirs` gives the container's user (its dry run prints the chown)."""
    result = run([*run_as, "make", "--no-print-directory", "-n", "dirs", *make_args], folder)
    return re.search(r'chown "(\d+):(\d+)"', result.stdout).groups()


def test_the_container_user_follows_whoever_runs_make(default_project, tmp_path):
    uid, gid = os.getuid(), os.getgid()
    # root builds for 1000: an image user that is root would defeat the non-root default.
    assert container_user(default_project) == (str(uid or 1000), str(gid or 1000))
    assert container_user(default_project, "APP_UID=1234", "APP_GID=2345") == ("1234", "2345")
    if uid == 0:
        # Another user, in a folder that user can read.
        folder = tmp_path / "other"
        folder.mkdir()
        for name in ("Makefile", ".env"):
            (folder / name).write_text((default_project / name).read_text())
        for path in (tmp_path, folder):
            path.chmod(0o755)
        someone = ["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups"]
        assert container_user(folder, run_as=someone) == ("4321", "4321")


def test_fresh_start_moves_the_last_runs_checkpoints_and_logs_aside_and_deletes_nothing(tmp_path):
    root = render(tmp_path)
    (root / "checkpoints" / "ckpt-epoch0003.pt").write_text("weights")
    (root / "logs" / "samples").mkdir()
    (root / "logs" / "samples" / "rank0.jsonl").write_text("ids")
    (root / "logs" / "metrics.jsonl").write_text("rows")
    # No job runs (Compose lists no running container): `true` stands in for it.
    result = run(["make", "--no-print-directory", "fresh-start", "COMPOSE=true"], root)
    assert result.returncode == 0, result.stderr
    (aside,) = (root / "previous-runs").iterdir()
    assert f"moved checkpoints/ logs/ to previous-runs/{aside.name}/" in result.stdout
    assert (aside / "checkpoints" / "ckpt-epoch0003.pt").read_text() == "weights"
    assert (aside / "logs" / "samples" / "rank0.jsonl").read_text() == "ids"
    assert (aside / "logs" / "metrics.jsonl").read_text() == "rows"
    for folder in ("checkpoints", "logs"):  # what git keeps stays
        assert [p.name for p in (root / folder).iterdir()] == [".gitkeep"]
    running = run(["make", "fresh-start", "COMPOSE=echo"], root)  # "a container runs"
    assert running.returncode != 0 and "make down first" in running.stderr
