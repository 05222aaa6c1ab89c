"""Kubernetes, without a cluster: the manifests validate against the published PyTorchJob CRD
schema (read from ../shared/schemas or $PYTORCHJOB_SCHEMA, never copied here), and against
Kubernetes' own schemas of a named release, strictly (kubernetes-validate, offline)."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from helpers import TEMPLATE, render, sh, tool

SCHEMA_NAME = "pytorchjob-kubeflow.org-v1.json"
KUBERNETES = "1.33"  # the release whose schemas the manifests must pass


@pytest.fixture(scope="module")
def schema():
    path = Path(
        os.environ.get("PYTORCHJOB_SCHEMA", TEMPLATE.parent / "shared" / "schemas" / SCHEMA_NAME)
    )
    if not path.exists():
        message = f"the PyTorchJob schema is missing at {path} (set PYTORCHJOB_SCHEMA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message + ": skipped outside CI")
    return path


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = render(tmp_path_factory.mktemp("k8s"), nodes=4)
    sh(["make", "k8s-manifests", "IMAGE=registry.example.com/ml/ddp:1.0"], cwd=root)
    out = root / "build" / "k8s"
    return (
        root,
        yaml.safe_load((out / "pytorchjob.yaml").read_text()),
        list(yaml.safe_load_all((out / "job.yaml").read_text())),
        list(yaml.safe_load_all((out / "rendezvous.yaml").read_text())),
    )


def validate(schema_file, document, tmp_path, name):
    target = tmp_path / f"{name}.json"
    target.write_text(json.dumps(document))
    return sh(
        [tool("check-jsonschema"), "--schemafile", str(schema_file), str(target)], check=False
    )


def test_pytorchjob_validates_against_the_crd_schema(schema, manifests, tmp_path):
    _, job, _, _ = manifests
    result = validate(schema, job, tmp_path, "pytorchjob")
    assert result.returncode == 0, result.stdout + result.stderr
    specs = job["spec"]["pytorchReplicaSpecs"]
    # All nodes alike: no Master replica, whose pod would be the job's single point of failure.
    assert list(specs) == ["Worker"] and specs["Worker"]["replicas"] == 4
    assert job["spec"]["elasticPolicy"] == {
        "rdzvBackend": "c10d",
        "minReplicas": 1,
        "maxReplicas": 4,
        "maxRestarts": 3,
    }
    pod = specs["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["image"] == "registry.example.com/ml/ddp:1.0"
    assert container["resources"]["limits"] == {"cpu": "1.0", "memory": "2Gi"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_the_validator_rejects_a_broken_pytorchjob(schema, manifests, tmp_path):
    _, job, _, _ = manifests
    broken = json.loads(json.dumps(job))
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "three"
    assert validate(schema, broken, tmp_path, "broken").returncode != 0


def test_plain_job_pod_template_validates(schema, manifests, tmp_path):
    _, _, documents, _ = manifests
    job = next(d for d in documents if d["kind"] == "Job")
    full = json.loads(Path(schema).read_text())
    template_schema = full["properties"]["spec"]["properties"]["pytorchReplicaSpecs"][
        "additionalProperties"
    ]["properties"]["template"]
    schema_file = tmp_path / "podtemplatespec.json"
    schema_file.write_text(json.dumps(template_schema))
    result = validate(schema_file, job["spec"]["template"], tmp_path, "template")
    assert result.returncode == 0, result.stdout + result.stderr
    assert job["apiVersion"] == "batch/v1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    # A usage or data error (status 2) ends the Job instead of using up backoffLimit; Kubernetes
    # takes a podFailurePolicy only with restartPolicy Never.
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "pytorch", "operator": "In", "values": [2]},
        }
    ]


def test_every_training_pod_dials_the_rendezvous_service_which_trains_nothing(manifests):
    root, job, documents, rendezvous = manifests
    name = root.name
    service = next(d for d in rendezvous if d["kind"] == "Service")
    store = next(d for d in rendezvous if d["kind"] == "Job")
    assert service["metadata"]["name"] == f"{name}-rendezvous"
    assert service["spec"]["selector"] == {"job-name": store["metadata"]["name"]}
    assert service["spec"]["ports"][0]["port"] == 29400
    container = store["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "launcher.rendezvous"]
    assert store["spec"]["backoffLimit"] == 0  # a new store would not know the running rounds
    plain = next(d for d in documents if d["kind"] == "Job")["spec"]["template"]["spec"]
    operator = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    for pod in (plain, operator):
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["RDZV_ADDR"] == f"{name}-rendezvous"
        # The image's own command (python -m launcher) runs, the same on every pod.
        assert "command" not in pod["containers"][0] and "args" not in pod["containers"][0]


def strictly(tmp_path, name, *documents):
    """kubernetes-validate --strict: unknown fields fail too, not only wrong types."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    command = [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES, str(path)]
    return sh(command, check=False)


def pods(manifests):
    """The plain Job's and the PyTorchJob's pod specs."""
    _, job, documents, _ = manifests
    plain = next(d for d in documents if d["kind"] == "Job")["spec"]["template"]["spec"]
    return plain, job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def test_a_usage_error_is_not_restarted_and_a_killed_pod_is_replaced(manifests):
    """Kubeflow's ExitCode policy: 1-127 fail the job, 128+ (killed, evicted) restart the pod;
    the plain Job fails at once on 2 (podFailurePolicy) and retries the rest (backoffLimit)."""
    _, job, documents, _ = manifests
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    plain = next(d for d in documents if d["kind"] == "Job")
    assert plain["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert plain["spec"]["backoffLimit"] == 3  # MAX_RESTARTS: a killed pod is retried


def test_a_pod_that_stopped_training_is_replaced_by_its_liveness_probe(manifests):
    """docs/health.md: Kubernetes restarts a pod whose ranks made no step for HEALTH_TIMEOUT."""
    _, job, documents, _ = manifests
    plain = next(d for d in documents if d["kind"] == "Job")
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    for pod in (plain["spec"]["template"]["spec"], worker):
        (container,) = pod["containers"]
        probe = container["livenessProbe"]
        assert probe["exec"]["command"] == ["bash", "/app/docker/healthcheck.sh"]
        assert probe["periodSeconds"] * probe["failureThreshold"] <= 60


def test_the_restart_marker_outlives_a_container_and_checkpoints_a_pod(manifests):
    for pod in pods(manifests):
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # kubelet starts a fresh container on a restart: the marker is on the pod's volume.
        assert env["NODE_MARKER"] == "/node-state/started"
        assert volumes[mounts["/node-state"]]["emptyDir"] == {}
        # Every pod, and every retry, saves to and resumes from the same claim.
        claim = volumes[mounts["/checkpoints"]]["persistentVolumeClaim"]["claimName"]
        assert claim == f"{manifests[0].name}-checkpoints"


def test_both_jobs_mount_data_read_only_and_logs_each_from_a_claim(manifests):
    name = manifests[0].name
    for pod in pods(manifests):
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        data, logs = mounts["/data"], mounts["/logs"]
        assert data.get("readOnly") is True and not logs.get("readOnly")
        assert volumes[data["name"]]["persistentVolumeClaim"] == {
            "claimName": f"{name}-data",
            "readOnly": True,
        }
        assert volumes[logs["name"]]["persistentVolumeClaim"]["claimName"] == f"{name}-logs"


def test_the_claims_are_knobs(tmp_path):
    root = render(tmp_path, nodes=2)
    claims = ["CHECKPOINT_PVC=team-ckpt", "DATA_PVC=team-data", "LOGS_PVC=team-logs"]
    sh(["make", "k8s-manifests", "IMAGE=r.example.com/x:1", *claims], cwd=root)
    for manifest in ("pytorchjob.yaml", "job.yaml"):
        text = (root / "build" / "k8s" / manifest).read_text()
        found = re.findall(r"claimName: (\S+)", text)
        assert found == ["team-ckpt", "team-data", "team-logs"], manifest


def test_each_rendering_is_a_job_with_a_run_id_nobody_can_guess(tmp_path, manifests):
    root = manifests[0]
    ids = []
    for _ in range(2):
        sh(["make", "k8s-manifests", "IMAGE=r.example.com/x:1"], cwd=root)
        texts = [(root / "build" / "k8s" / m).read_text() for m in ("job.yaml", "rendezvous.yaml")]
        found = {i for text in texts for i in re.findall(r"name: RUN_ID\n\s+value: (\S+)", text)}
        assert len(found) == 1, found  # the rendezvous service and the nodes agree
        ids.append(found.pop())
    assert ids[0] != ids[1] and all(re.fullmatch(rf"{root.name}-[0-9a-f]{{32}}", i) for i in ids)


def test_slurm_binds_the_folders_training_needs_and_keeps_a_marker_per_job_and_task(tmp_path):
    sbatch = (render(tmp_path, nodes=2) / "slurm" / "train.sbatch").read_text()
    mounts = re.search(r'^mounts="(.+)"$', sbatch, re.MULTILINE).group(1).split(",")
    assert {m.split(":", 1)[1] for m in mounts} == {
        "/app",
        "/data:ro",
        "/checkpoints",
        "/logs",
        "/cache",
    }
    assert '--bind "$mounts"' in sbatch and '--container-mounts="$mounts"' in sbatch
    assert 'NODE_MARKER="/tmp/$SLURM_JOB_ID-$SLURM_PROCID.node-started"' in sbatch
    assert 'RUN_ID="$SLURM_JOB_ID-$(od -An -N16 -tx1 /dev/urandom' in sbatch


def test_every_pod_reads_the_knobs_from_the_settings_config_map(manifests):
    root = manifests[0]
    settings = yaml.safe_load((root / "build" / "k8s" / "settings.yaml").read_text())
    assert settings["metadata"]["name"] == f"{root.name}-settings"
    assert settings["data"]["NODES"] == "4" and settings["data"]["NPROC_PER_NODE"] == "1"
    for pod in pods(manifests):
        container = pod["containers"][0]
        assert container["envFrom"] == [{"configMapRef": {"name": f"{root.name}-settings"}}]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]  # a CPU render


def test_a_gpu_render_requests_a_gpu_per_process_on_kubernetes_and_slurm(tmp_path):
    root = render(tmp_path, gpu="cu128")
    sh(["make", "k8s-manifests", "IMAGE=r.example.com/x:1", "NPROC_PER_NODE=4"], cwd=root)
    out = root / "build" / "k8s"
    job = yaml.safe_load((out / "pytorchjob.yaml").read_text())
    plain = next(
        d for d in yaml.safe_load_all((out / "job.yaml").read_text()) if d["kind"] == "Job"
    )
    for pod in (
        job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"],
        plain["spec"]["template"]["spec"],
    ):
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    sbatch = (root / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=1\n" in sbatch
    assert "apptainer exec --nv " in sbatch


def test_job_and_rendezvous_pass_kubernetes_strict_validation(manifests, tmp_path):
    root, _, documents, rendezvous = manifests
    settings = yaml.safe_load((root / "build" / "k8s" / "settings.yaml").read_text())
    result = strictly(tmp_path, "job", *documents, *rendezvous, settings)
    assert result.returncode == 0, result.stdout + result.stderr
    for kind in ("job", "service", "configmap"):
        assert f"passed for resource {kind}/" in result.stdout + result.stderr


def test_pytorchjob_pod_templates_pass_kubernetes_strict_validation(manifests, tmp_path):
    """The CRD's schema leaves the pod template open; Kubernetes' PodTemplate schema does not."""
    _, job, _, _ = manifests
    for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": role.lower()},
            "template": spec["template"],
        }
        result = strictly(tmp_path, role, template)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "break_it",
    [
        lambda pod: pod["containers"][0].update(imagePullPolcy="Always"),  # a misspelt field
        lambda pod: pod.update(restartPolicy=["Never"]),  # a wrong type
    ],
    ids=["unknown-field", "wrong-type"],
)
def test_kubernetes_strict_validation_rejects_a_broken_job(manifests, tmp_path, break_it):
    _, _, documents, _ = manifests
    broken = json.loads(json.dumps(documents))
    break_it(next(d for d in broken if d["kind"] == "Job")["spec"]["template"]["spec"])
    assert strictly(tmp_path, "broken", *broken).returncode != 0
