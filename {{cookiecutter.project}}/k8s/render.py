"""Fill the ${...} of the Kubernetes manifests in from .env and the environment, and write the
launcher's knobs (launcher/settings.py KNOBS) into a ConfigMap that every training pod reads, so
that a pod runs with the same settings as a Compose node.

usage: python k8s/render.py OUT_DIR     (make k8s-manifests IMAGE=registry/name:tag)
"""

import json
import os
import re
import secrets
import sys
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent


def read_env(path):
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def quantity(size):
    """Compose sizes (2G = 2 GiB) as Kubernetes quantities (2Gi; 2G would be 10^9 bytes)."""
    match = re.fullmatch(r"([0-9.]+)\s*([kmgKMG])?[bB]?", size)
    if not match:
        raise SystemExit(f"ERROR: {size!r} is not a size such as 2G")
    number, unit = match.groups()
    return number + (unit.upper() + "i" if unit else "")


def settings():
    env = read_env(HERE.parent / ".env")
    # Settings given on the make command line (or in the environment) win over .env.
    env.update({k: v for k, v in os.environ.items() if k in env})
    values = {
        **env,
        "PROJECT": env["COMPOSE_PROJECT_NAME"],
        # The job's secret, one per rendering (docs/security.md): whoever cannot read these
        # manifests cannot guess it, so cannot join or steer the job through the rendezvous.
        "RUN_ID": f"{env['COMPOSE_PROJECT_NAME']}-{secrets.token_hex(16)}",
        # The claim checkpoints are saved to (make k8s-manifests CHECKPOINT_PVC=name).
        "CHECKPOINT_PVC": os.environ.get("CHECKPOINT_PVC")
        or f"{env['COMPOSE_PROJECT_NAME']}-checkpoints",
        # The task's data (mounted read-only) and the logs, each a claim of its own.
        "DATA_PVC": os.environ.get("DATA_PVC") or f"{env['COMPOSE_PROJECT_NAME']}-data",
        "LOGS_PVC": os.environ.get("LOGS_PVC") or f"{env['COMPOSE_PROJECT_NAME']}-logs",
        "MEMORY": quantity(env["MEMORY"]),
        "SHM_SIZE": quantity(env["SHM_SIZE"]),
    }
    if int(env["NODES"]) > int(env["MAX_NODES"]):
        # The manifests fix the pod count: more than MAX_NODES could only wait as spares.
        print(
            f"ERROR: NODES={env['NODES']} pods but MAX_NODES={env['MAX_NODES']}: lower NODES or"
            " raise MAX_NODES",
            file=sys.stderr,
        )
        sys.exit(2)
    if "GPUS" in env:  # a GPU render: each pod requests a number of GPUs
        count = next((v for v in (env["NPROC_PER_NODE"], env["GPUS"]) if v.isdigit()), None)
        if count is None:
            raise SystemExit(
                "ERROR: a pod requests a number of GPUs: set NPROC_PER_NODE (or GPUS) to one,"
                " e.g. make k8s-manifests NPROC_PER_NODE=8"
            )
        values["GPU_REQUEST"] = count
    return values


def knobs():
    sys.path.insert(0, str(HERE.parent))
    from launcher.settings import KNOBS  # imports no torch

    return KNOBS


def config_map(values):
    """The ConfigMap `<project>-settings`: JSON strings are YAML strings, quoted as needed."""
    data = "".join(f"  {name}: {json.dumps(values[name])}\n" for name in knobs())
    return (
        "# The launcher's knobs, from .env and the make command line (k8s/render.py).\n"
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {values['PROJECT']}-settings\n"
        f"data:\n{data}"
    )


def main(out_dir):
    values = settings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.yaml").write_text(config_map(values))
    print(f"wrote {out / 'settings.yaml'}")
    for manifest in ("rendezvous.yaml", "pytorchjob.yaml", "job.yaml"):
        text = Template((HERE / manifest).read_text()).safe_substitute(values)
        # CPUS=0 or MEMORY=0 is no limit (GPU renders' default), as in Compose: no line at all.
        text = re.sub(r'(?m)^ +(cpu|memory): "?0"?\n', "", text)
        text = re.sub(r"(?m)^( +)(limits|requests):\n(?!\1 )", "", text)  # left empty
        left = sorted(set(re.findall(r"\$\{(\w+)\}", text)))
        if left:
            raise SystemExit(f"ERROR: {manifest}: no value for {', '.join(left)}")
        (out / manifest).write_text(text)
        print(f"wrote {out / manifest} (image {values['IMAGE']})")
    if "/" not in values["IMAGE"]:
        print(
            f"note: {values['IMAGE']} names no registry: push the image, then run "
            "make k8s-manifests IMAGE=registry.example.com/team/name:tag"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
