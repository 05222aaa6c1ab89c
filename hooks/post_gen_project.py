"""Remove what the chosen options do not use, make scripts executable, say what to type next."""

import json
import shutil
import stat
from pathlib import Path

ANSWERS = json.loads(r"""{{ cookiecutter | tojson }}""")

# Paths that exist in the template only for some answers: (answer, value that keeps them, paths).
OPTIONAL = (
    ("__gpu", "yes", ["compose.gpu.yaml"]),
    ("mirror", "tuna", ["docker/pip.conf"]),
    (
        "cluster_engines",
        "yes",
        ["k8s", "slurm", "compose.swarm.yaml", "compose.node.yaml", "swarm", "docs/engines.md"],
    ),
)


def remove_unused(root):
    for key, keep_value, paths in OPTIONAL:
        if ANSWERS[key] != keep_value:
            for path in paths:
                target = root / path
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()


def make_executable(root):
    for script in (root / "slurm").glob("*.sbatch"):
        mode = script.stat().st_mode
        script.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def main():
    root = Path.cwd()
    remove_unused(root)
    make_executable(root)
    print(f"\nCreated {root}. Next:\n")
    print(f"    cd {ANSWERS['project']}")
    print("    # your model and data: task.py (README: Bring your own model)")
    print("    make build      # build the image (Miniconda env + your code)")
    print(f"    make up         # train on {ANSWERS['nodes']} node(s); status in build/status")
    print()


if __name__ == "__main__":
    main()
