"""Refuse answers that would render a broken project: one clear line each, no traceback.

Cookiecutter renders this file with Jinja before running it; the answers arrive as one JSON
string so that the file stays valid Python before and after rendering.
"""

import json
import keyword
import re
import sys

ANSWERS = json.loads(r"""{{ cookiecutter | tojson }}""")

PYTHON_VERSIONS = ("3.10", "3.11", "3.12")
# Compose project names: lowercase letters, digits, dashes and underscores, starting with a
# letter or digit. The folder name is the same string, so it is safe on every OS too.
PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# The sizes Compose accepts for mem_limit and shm_size: a number and an optional unit.
SIZE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?([bkmg]|[kmg]b)?$", re.IGNORECASE)
VERSION_RE = re.compile(r"^[0-9]+\.[0-9]+(\.[0-9]+)?$")

# No combination of answers is refused: pairs that once could be contradictory (gpu=no with a
# CUDA flavour, Miniforge with Anaconda's terms) are one question each, and cookiecutter itself
# refuses an answer that is not one of a question's choices.


def _int_at_least(value, low):
    try:
        return int(value) >= low
    except ValueError:
        return False


def _float_at_least_0(value):
    try:
        return float(value) >= 0
    except ValueError:
        return False


def errors(a):
    """Yield one message per bad answer."""
    if not PROJECT_RE.match(a["project"]):
        yield (
            f"project {a['project']!r} is not a valid folder/Compose project name: use lowercase "
            "letters, digits, '-' and '_', starting with a letter or digit"
        )
    if not a["package"].isidentifier() or keyword.iskeyword(a["package"]):
        yield f"package {a['package']!r} is not a Python identifier: use letters, digits and '_'"
    if a["python_version"] not in PYTHON_VERSIONS:
        yield f"python_version {a['python_version']!r} is not one of {', '.join(PYTHON_VERSIONS)}"
    if not _int_at_least(a["nodes"], 1):
        yield f"nodes must be a whole number >= 1, got {a['nodes']!r}"
    if not _float_at_least_0(a["cpus_per_node"]):
        yield f"cpus_per_node must be a number (e.g. 1.0; 0: no limit), got {a['cpus_per_node']!r}"
    for key in ("memory_per_node", "shm_size"):
        if not SIZE_RE.match(a[key]):
            yield f"{key} must be a size such as 512M or 2G, got {a[key]!r}"
    for key in ("uid", "gid"):
        if a[key] != "auto" and not _int_at_least(a[key], 1):
            yield f"{key} must be auto (the user who builds) or a whole number >= 1, got {a[key]!r}"
    for key in ("torch_version", "torchvision_version"):
        if not VERSION_RE.match(a[key]):
            yield f"{key} must be a version such as 2.14.1, got {a[key]!r}"


def main():
    found = list(errors(ANSWERS))
    for message in found:
        print(f"ERROR: {message}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
