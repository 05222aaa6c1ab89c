"""`make up` for real: training nodes and their rendezvous service as Compose services.

Replaced here: the conda env stage only. The runtime stage is built on the stand-in env image
(Debian's Python with the same pip packages; see scripts/standin-image.sh) because this CI
reaches no registry or conda channel. The tests share one built project (tests/conftest.py),
each with its own checkpoint folder, and each runs alone too.
"""

import json
import re
import time
import urllib.request

from helpers import losses, record, sh, wait_until

OWN_SCRIPT = '''\
"""A script written for torchrun's contract: env:// reads MASTER_ADDR and MASTER_PORT."""
import argparse
import os

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--value", type=float, required=True)
args = parser.parse_args()
dist.init_process_group(
    "gloo", init_method="env://",
    rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
)
total = torch.tensor([args.value])
dist.all_reduce(total)
print(f"own script: rank {dist.get_rank()} of {dist.get_world_size()} sum {total.item()}")
dist.destroy_process_group()
'''


def test_up_trains_to_completion(trained):
    project, out = trained.project, trained.output
    found = losses(out)
    assert len(found) == 3 and found[-1] < found[0], out[-3000:]
    assert "world size 2" in out
    checkpoint = project.root / "checkpoints" / "trained" / "ckpt-epoch0003.pt"
    log = project.root / "logs" / "train.log"
    assert checkpoint.exists() and "final loss" in log.read_text()
    for path in (checkpoint, log):
        assert (path.stat().st_uid, path.stat().st_gid) == (1000, 1000), path
    # Per-node logs on the host (rank 0's in the node that held it), metrics as JSON lines and
    # TensorBoard events.
    assert len(trained.node_logs) == 2, trained.node_logs
    texts = [(project.root / "logs" / name).read_text() for name in trained.node_logs]
    assert sum("epoch 3/3" in text for text in texts) == 1, trained.node_logs
    assert trained.metrics_lines == 3
    assert list((project.root / "logs" / "tb").glob("events.out.tfevents.*"))


def test_limits_shm_security_and_non_root_user(project):
    project.compose("create", "--force-recreate", "--scale", "node=2")
    ids = project.compose("ps", "--all", "-q", "node").stdout.split()
    service = project.compose("ps", "--all", "-q", "rendezvous").stdout.split()
    assert len(ids) == 2 and len(service) == 1
    for container in json.loads(sh(["docker", "inspect", *ids, *service]).stdout):
        host = container["HostConfig"]
        node = container["Id"] in ids
        assert host["NanoCpus"] == (1_000_000_000 if node else 500_000_000)
        assert host["Memory"] == (2 if node else 1) * 2**30
        if node:
            assert host["ShmSize"] == 2**30
        assert host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["CapDrop"] == ["ALL"]
        assert not host["PortBindings"]
        assert container["Config"]["User"] == "1000:1000"
    code, out = project.run("node", "id", "-u")
    assert code == 0 and out.split()[-1] == "1000"


def test_make_plot_writes_a_png(trained):
    project = trained.project
    project.make("plot")
    png = (project.root / "logs" / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def serves(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_make_tensorboard_serves_on_loopback(project):
    project.make("tensorboard")
    try:
        wait_until(lambda: serves("http://127.0.0.1:6006/"), 90, "TensorBoard answering")
    finally:
        project.compose("--profile", "tensorboard", "rm", "--stop", "--force", "tensorboard")


def test_four_nodes_have_distinct_hosts_and_identical_weights(project):
    result = project.make(
        "up", "NODES=4", "ARGS=--epochs 1 --samples 512 --checkpoint-dir /checkpoints/four"
    )
    out = result.stdout
    assert len(project.compose("ps", "--all", "-q", "node").stdout.split()) == 4
    assert "world size 4" in out
    line = re.search(r"weights by rank: (.*)$", out, re.MULTILINE)
    assert line, out[-3000:]
    ranks = re.findall(r"(\d)@(\S+)=(\w+)", line.group(1))
    assert [r for r, _, _ in ranks] == ["0", "1", "2", "3"]
    assert len({host for _, host, _ in ranks}) == 4
    assert len({fp for _, _, fp in ranks}) == 1


def test_own_script_written_for_torchruns_contract_runs_unchanged(project):
    (project.root / "own_job.py").write_text(OWN_SCRIPT)
    result = project.make("up", "SCRIPT=own_job.py", "ARGS=--value 3")
    assert "own script: rank 0 of 2 sum 6.0" in result.stdout
    assert "own script: rank 1 of 2 sum 6.0" in result.stdout


def test_a_node_started_first_waits_for_the_rendezvous_service(project):
    args = {"ARGS": "--epochs 1 --samples 256 --checkpoint-dir /checkpoints/late-rendezvous"}
    project.compose("down", "--remove-orphans")
    project.compose("up", "--detach", "--no-deps", "--scale", "node=2", "node", **args)
    waiting = "waiting for the rendezvous service rendezvous:29400"
    wait_until(lambda: project.logs("node").count(waiting) == 2, 60, "both nodes waiting")
    assert "is up after" not in project.logs("node")
    project.compose("up", "--detach", "--no-deps", "rendezvous", **args)
    project.compose("wait", "node", "rendezvous", timeout=300)
    log = project.logs("node")
    assert len(re.findall(r"rendezvous rendezvous:29400 is up after \d+s", log)) == 2, log
    assert "final loss" in log
    assert "the job's rendezvous is closed: stopping" in project.logs("rendezvous")
    assert project.exit_codes() == ["node 0", "node 0", "rendezvous 0"]


def test_make_test_runs_the_suite_inside_the_image(project):
    """The suite but its multi-node elastic tests and its train_dist.py runs, which
    test_generated_host.py runs on the host and the e2e tests repeat in containers: in a node
    they took most of the suite's 15 minutes here, a large share of CI's budget. What is left
    checks the image's environment: the launcher, checkpoints, data, the loss and metrics. On
    both CPUs, as a user's `make test CPUS=2` would."""
    ignore = "PYTEST_ARGS=--ignore=tests/test_elastic.py --ignore=tests/test_cli.py"
    result = project.make("test", ignore, "CPUS=2", timeout=900)
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]
    assert " failed" not in result.stdout and " error" not in result.stdout
    assert "test_launch.py" in result.stdout and "test_checkpoint.py" in result.stdout
    assert "test_elastic.py" not in result.stdout and "test_cli.py" not in result.stdout


def test_extra_ca_certificate_is_trusted_in_the_image(project, tmp_path):
    # A corporate proxy's CA: `make build CA_CERT=...` must put it into the image's trust store.
    key, cert = tmp_path / "ca.key", tmp_path / "ca.crt"
    sh(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=ddp-template test proxy CA",
            "-keyout",
            key,
            "-out",
            cert,
        ]
    )
    try:
        project.make("build", f"CA_CERT={cert}")
        _, bundle = project.run("node", "cat", "/etc/ssl/certs/ca-certificates.crt")
    finally:
        (project.root / "docker" / "certs" / "extra-ca.crt").unlink(missing_ok=True)
    pem_body = "".join(cert.read_text().splitlines()[1:-1])
    assert pem_body in "".join(bundle.splitlines())


def test_code_only_change_rebuilds_only_the_code_layer(project):
    script = project.root / "train_dist.py"
    original = script.read_text()
    script.write_text(original + "\n# a code-only change\n")
    try:
        started = time.perf_counter()
        result = project.compose("--progress", "plain", "build", "node")
        seconds = time.perf_counter() - started
    finally:
        script.write_text(original)
    log = result.stdout + result.stderr
    user_step = re.search(r"#(\d+) \[(?:node )?runtime \d+/\d+\] RUN if ! getent group", log)
    assert user_step and re.search(rf"^#{user_step.group(1)} CACHED$", log, re.MULTILINE), log
    copy_step = re.search(r"#(\d+) \[(?:node )?runtime \d+/\d+\] COPY \. /app", log)
    assert copy_step and not re.search(rf"^#{copy_step.group(1)} CACHED$", log, re.MULTILINE), log
    record(code_only_rebuild_s=round(seconds, 2))


def test_down_leaves_no_containers_or_networks(project):
    project.compose("create", "--scale", "node=2")
    assert project.containers() and project.networks()
    project.make("down")
    assert project.containers() == []
    assert project.networks() == []
