"""`make bench`: start-up, overhead, the training loop, scaling, collectives, rebuild, elastic
events and the peer (TorchX), measured in one run.

Renders the default project (Python 3.11) into build/bench, builds it on the stand-in env image
(the conda env stage is the one part replaced, as in the tests), and writes bench/results.json,
bench/results.md and bench/results.png. Every figure is the median of BENCH_REPEAT runs (3), with
min and max. Exits 1 if a ratio is far off its target; the tests never time anything.
"""

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1]
HERE = TEMPLATE / "bench"
RESULTS = HERE / "results.json"
WORK = TEMPLATE / "build" / "bench"
PROJECT = WORK / "ddp-bench"
# Host jobs' checkpoints and logs, out of the project (containers write to /checkpoints there).
BENCH_DIRS = f" --checkpoint-dir {WORK}/bench-ckpt --log-dir {WORK}/bench-logs"
ENV_IMAGE = os.environ.get("STANDIN_IMAGE", "ddp-template-env:standin")
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
TRAIN_ARGS = "--epochs 3 --samples 4096 --batch-size 64"
# Loop comparisons look for a few per cent: more epochs (one is ~0.6 s) and more runs.
LOOP_ARGS = f"--epochs 10 --samples 4096 --batch-size 64{BENCH_DIRS}"
LOOP_PAIRS = max(REPEAT, 10)
SIZES = [4096 * 4**i for i in range(8)]  # 4 KB .. 64 MB


def run(args, env=None, check=True, timeout=900):
    result = subprocess.run(
        args,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "ENV_IMAGE": ENV_IMAGE, **(env or {})},
    )
    if check and result.returncode != 0:
        sys.exit(
            f"bench: {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return result


def compose(*args, env=None, **kwargs):
    return run(["docker", "compose", *args], env=env, **kwargs)


def spread(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 4) for v in values],
    }


def job(nodes, script, args, cpus=1.0, env=None, files=("compose.yaml",), service="node"):
    """Run one job in containers; return (time `up` was called, the nodes' log, phases), where
    phases holds the seconds after `up` at which the last container started and the last node
    had imported torch (its "waiting for the rendezvous service" line). `service`: the one whose
    containers train (the seed's pattern has its own, and then no `node` runs)."""
    scale = nodes if service == "node" else 0
    env = {"NODES": str(nodes), "CPUS": str(cpus), "SCRIPT": script, "ARGS": args, **(env or {})}
    flags = [f for name in files for f in ("-f", name)]
    compose(*flags, "down", "--remove-orphans", env=env)
    shutil.rmtree(PROJECT / "checkpoints" / "bench", ignore_errors=True)
    started = time.time()
    compose(*flags, "up", "--detach", "--scale", f"node={scale}", env=env)
    compose(*flags, "wait", service, env=env, check=False)
    log = compose(*flags, "logs", "--no-color", "--no-log-prefix", service, env=env).stdout
    stamped = compose(*flags, "logs", "--no-color", "--timestamps", env=env).stdout
    ids = compose(*flags, "ps", "--all", "--quiet", service, env=env).stdout.split()
    starts = run(["docker", "inspect", "-f", "{{.State.StartedAt}}", *ids]).stdout.split()
    imported = re.findall(r"(\S+) waiting for the rendezvous service", stamped)
    phases = {
        "containers_started": max(map(epoch, starts)) - started,
        "workers_imported": max(map(epoch, imported)) - started if imported else None,
    }
    compose(*flags, "down", "--remove-orphans", env=env)
    return started, log, phases


def epoch(stamp):
    """Seconds since the epoch of Docker's RFC 3339 time (nanoseconds cut to microseconds)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{whole}.{fraction[:6]:0<6}+00:00").timestamp()


def host_job(nprocs, script, args, threads=1, pin=False):
    """A job of `nprocs` processes on the host under torchrun; `pin`: rank r on core r alone
    (taskset), so that the ranks' threads do not take turns on each other's core."""
    shutil.rmtree(WORK / "bench-ckpt", ignore_errors=True)  # no resume: every run trains
    env = {"OMP_NUM_THREADS": str(threads)}
    env.pop("RANK", None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch.append(f"--nproc-per-node={nprocs}")
    if pin:
        cores = os.cpu_count()
        pinned = f'exec taskset -c $((LOCAL_RANK % {cores})) "{sys.executable}" "$@"'
        launch += ["--no-python", "bash", "-c", pinned, "pinned"]
    return run([*launch, script, *args.split()], env=env).stdout


def samples_per_s(log):
    # Epoch lines only: train_dist.py's "final" line repeats the last epoch's.
    rates = [float(x) for x in re.findall(r"\bepoch \d+\S* .*?samples/s (\d+)", log)]
    if len(rates) < 2:
        sys.exit(f"bench: no throughput in the log:\n{log[-2000:]}")
    return statistics.median(rates[1:])  # the first epoch pays for warm-up


def collectives(log):
    return {r["bytes"]: r["seconds"] for r in map(json.loads, re.findall(r"^\{.*\}$", log, re.M))}


def seed_override(nodes):
    """The seed's pattern: static ranks written per service (a `master` and workers), workers
    start after `sleep 10`."""
    torchrun = (
        "torchrun --nnodes {n} --node-rank {r} --nproc-per-node 1 --master-addr master "
        "--master-port 29500 join.py"
    )
    services = {}
    for rank in range(nodes):
        services["master" if rank == 0 else f"seed-worker-{rank}"] = {
            "image": "${IMAGE}",
            "hostname": "master" if rank == 0 else f"seed-worker-{rank}",
            "networks": ["ddp"],
            "volumes": ["./:/app:ro"],
            "working_dir": "/app",
            "entrypoint": ["bash", "-c"],
            "command": [("sleep 10 && " if rank else "") + torchrun.format(n=nodes, r=rank)],
        }
    path = PROJECT / "seed.yaml"
    path.write_text(json.dumps({"services": services}, indent=2))
    return path.name


def import_seconds(cpus):
    """Seconds `import torch` takes in the image with this CPU limit."""
    seconds = []
    for _ in range(REPEAT):
        cmd = ["docker", "run", "--rm", f"--cpus={cpus}", "--entrypoint", "python", "ddp-bench"]
        started = time.perf_counter()
        run([*cmd, "-c", "import torch"])
        bare = time.perf_counter()
        run([*cmd, "-c", "pass"])
        # The container's own start and stop are left out.
        seconds.append((bare - started) - (time.perf_counter() - bare))
    return spread(seconds)


def bench_startup(results):
    startup = results["startup_s"]

    def joined(nodes, method="fork", **kwargs):
        seconds, phases = [], []
        for _ in range(REPEAT):
            started, log, phase = job(nodes, "join.py", "", env={"START_METHOD": method}, **kwargs)
            seconds.append(float(re.search(r"joined ([0-9.]+)", log).group(1)) - started)
            phases.append(phase)
        return spread(seconds), phases

    for nodes in (2, 4):
        startup[f"{nodes}_nodes"], phases = joined(nodes, cpus=2 / nodes)
    # Where the 4-node start-up goes: medians over the runs above.
    startup["4_nodes_phases"] = {
        key: statistics.median(p[key] for p in phases) for key in phases[0]
    }
    startup["4_nodes_spawn"], _ = joined(4, method="spawn", cpus=0.5)
    startup["import_torch_1_cpu"] = import_seconds(1)
    startup["import_torch_0.5_cpu"] = import_seconds(0.5)
    startup["seed_pattern_2_nodes"], _ = joined(
        2, files=("compose.yaml", seed_override(2)), service="master"
    )


def bench_overhead(results):
    host, container = [], []
    for _ in range(REPEAT):
        host.append(samples_per_s(host_job(2, "train_dist.py", TRAIN_ARGS + BENCH_DIRS)))
        container.append(samples_per_s(job(2, "train_dist.py", TRAIN_ARGS + CKPT)[1]))
    results["overhead"] = {
        "host_samples_per_s": spread(host),
        "container_samples_per_s": spread(container),
        "ratio": statistics.median(container) / statistics.median(host),
    }
    # Threads from the host's core count instead of the container's CPU limit.
    oversubscribed = [
        samples_per_s(
            job(
                2, "train_dist.py", TRAIN_ARGS + CKPT, env={"OMP_NUM_THREADS": str(os.cpu_count())}
            )[1]
        )
        for _ in range(REPEAT)
    ]
    results["threads"] = {
        "from_cgroup_limit_samples_per_s": spread(container),
        f"from_host_cores_{os.cpu_count()}_samples_per_s": spread(oversubscribed),
    }


def interleaved(first, second):
    """Two host jobs (2 processes, pinned), each a (name, script), run turn about LOOP_PAIRS
    times: each one's samples/s, and the median of the pairs' ratios first/second. This
    machine's throughput drifts by +-10% over minutes; the two runs of a pair see the same
    drift, and every other pair runs them in the other order."""
    rates = {first: [], second: []}
    for pair in range(LOOP_PAIRS):
        for name, script in (first, second) if pair % 2 == 0 else (second, first):
            rates[name, script].append(samples_per_s(host_job(2, script, LOOP_ARGS, pin=True)))
    ratios = [x / y for x, y in zip(rates[first], rates[second], strict=True)]
    return {
        **{f"{name}_samples_per_s": spread(values) for (name, _), values in rates.items()},
        "ratio": statistics.median(ratios),
        "ratios": {**spread(ratios), "pairs": LOOP_PAIRS},
    }


def bench_loop(results):
    """train_dist.py's generic loop (the task seam, sample ids, the stop vote, metrics, seeds)
    against a minimal hand-written DDP loop: same model, data, batch. And the asynchronous stop
    vote against the synchronous one it replaced (sync_vote.py). Both only time the epochs'
    training (validation and saves fall outside)."""
    results["loop"] = interleaved(("generic", "train_dist.py"), ("minimal", "minimal_ddp.py"))
    results["stop_vote"] = interleaved(("async", "train_dist.py"), ("sync", "sync_vote.py"))


def bench_scaling(results):
    sys.path.insert(0, str(PROJECT))
    from task import SmallCNN

    grad_bytes = 4 * sum(p.numel() for p in SmallCNN().parameters())  # float32 gradients
    for nodes in (1, 2, 4):
        cpus = 2 / nodes
        rates = [
            samples_per_s(job(nodes, "train_dist.py", TRAIN_ARGS + CKPT, cpus=cpus)[1])
            for _ in range(REPEAT)
        ]
        entry = {"cpus_per_node": cpus, "samples_per_s": spread(rates)}
        if nodes > 1:
            log = job(nodes, "collectives.py", f"--sizes {grad_bytes} --seconds 2", cpus=cpus)[1]
            entry["grad_allreduce_ms"] = 1000 * collectives(log)[grad_bytes]
            entry["step_ms"] = 1000 * 64 * nodes / statistics.median(rates)
        results["scaling"][f"{nodes}_nodes"] = entry


def bench_collectives(results):
    sizes = ",".join(map(str, SIZES))
    bridge = collectives(job(2, "collectives.py", f"--sizes {sizes}")[1])
    loopback = collectives(host_job(2, "collectives.py", f"--sizes {sizes}"))
    results["allreduce_gbit_per_s"] = {
        str(size): {
            "docker_bridge": 8 * size / bridge[size] / 1e9,
            "host_loopback": 8 * size / loopback[size] / 1e9,
        }
        for size in SIZES
    }


def bench_rebuild(results):
    cold, code_only = [], []
    for _ in range(REPEAT):
        started = time.perf_counter()
        compose("build", "--no-cache", "node")
        cold.append(time.perf_counter() - started)
        script = PROJECT / "train_dist.py"
        script.write_text(script.read_text() + "\n# a code-only change\n")
        started = time.perf_counter()
        run(["make", "build", f"ENV_IMAGE={ENV_IMAGE}"])
        code_only.append(time.perf_counter() - started)
    size = {
        image: int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image]).stdout)
        for image in (ENV_IMAGE, "ddp-bench:latest")
    }
    results["rebuild_s"] = {"cold_runtime_stage": spread(cold), "code_only": spread(code_only)}
    results["runtime_stage_adds_mb"] = (size["ddp-bench:latest"] - size[ENV_IMAGE]) / 2**20


CKPT = " --checkpoint-dir /checkpoints/bench"


def bench_elastic(results):
    """Seconds from a `docker kill` and a `docker stop` of the node holding rank 0, a `make
    scale NODES=3` and a `make scale NODES=2` to rank 0 resuming at the new world size, in one
    3-node `make up` each run; for the join, also its parts: the new node's own start (the
    container and its `import torch`), its arrival to training, and how long training paused
    (from the others' stop: they train on while the new node starts)."""
    seconds = {key: [] for key in ("kill", "leave", "scale_up", "scale_down")}
    seconds.update({key: [] for key in ("scale_up_started", "scale_up_joined", "scale_up_paused")})
    repeated = []  # samples trained twice in a run: its one kill's (the other events repeat none)
    args = "--epochs 16 --samples 16384 --batch-size 32 --checkpoint-dir /checkpoints/bench"
    args += " --log-dir /logs/bench --record-samples"
    for _ in range(REPEAT):
        for folder in ("checkpoints/bench", "logs/bench"):
            shutil.rmtree(PROJECT / folder, ignore_errors=True)
        up = Lines(["make", "up", "NODES=3", f"ARGS={args}", f"ENV_IMAGE={ENV_IMAGE}"])
        up.wait_for(r"epoch 1/16")
        for key, command, size in (
            ("kill", lambda: ["docker", "kill", holding_rank_0()], 2),
            ("scale_up", lambda: ["make", "scale", "NODES=3"], 3),
            ("leave", lambda: ["docker", "stop", holding_rank_0()], 2),
            ("scale_up", lambda: ["make", "scale", "NODES=3"], 3),
            ("scale_down", lambda: ["make", "scale", "NODES=2"], 2),
        ):
            command = command()
            asked = time.monotonic()
            run(command)
            if key == "scale_up":  # the others train on while the new node starts
                arrived = up.wait_for(r"rendezvous \S+ is up after")  # torch imported
                paused = up.wait_for(r"stop requested")
            up.wait_for(rf"world size {size}\b")
            resumed = up.wait_for(r"resumed from")  # the next step trains
            seconds[key].append(resumed - asked)
            if key == "scale_up":
                seconds["scale_up_started"].append(arrived - asked)
                seconds["scale_up_joined"].append(resumed - arrived)
                seconds["scale_up_paused"].append(resumed - paused)
        if up.finish() != 0:
            sys.exit(f"bench: make up failed:\n{''.join(line for _, line in up.lines)[-3000:]}")
        report = run(["make", "samples-report", "SAMPLES_DIR=logs/bench/samples"], check=False)
        repeated.append(sum(int(n) for n in re.findall(r"(\d+) repeated", report.stdout)))
    results["elastic_s"] = {key: spread(values) for key, values in seconds.items()}
    results["elastic_repeated_per_kill"] = spread(repeated)


def holding_rank_0():
    """The running node container whose rank 0 logged last, by the project's own `make chaos`."""
    nodes = compose("ps", "--status", "running", "--quiet", "node").stdout.split()
    spec = importlib.util.spec_from_file_location("chaos", PROJECT / "tools" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    holder = chaos.holding_rank_0(nodes)
    if holder is None:
        sys.exit("bench: no running node logged as rank 0")
    return holder


class Lines:
    """A command in the background; wait_for(pattern) returns when a new line matches it."""

    def __init__(self, args):
        env = {**os.environ, "ENV_IMAGE": ENV_IMAGE}
        self.process = subprocess.Popen(
            args, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines, self.read = [], 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, pattern, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self.read < len(self.lines):
                when, line = self.lines[self.read]
                self.read += 1
                if re.search(pattern, line):
                    return when
            time.sleep(0.05)
        text = "".join(line for _, line in self.lines)
        sys.exit(f"bench: never saw {pattern!r}:\n{text[-3000:]}")

    def finish(self):
        status = self.process.wait(timeout=900)
        self.reader.join()
        return status


TORCHX_ARGS = "--epochs 2 --samples 8192"


def bench_torchx(results):
    """The peer: TorchX's dist.ddp on local_docker runs the same image and script as one
    container per node (c10d). Interleaved with `make up`, at equal limits (2 nodes x 1 CPU,
    2 GiB), each way: end-to-end seconds of the command, seconds from the command to rank 0
    joined (join.py), and training samples/s."""
    ways = {
        "make_up": None,
        "torchx": [],  # as users get it: it sets no thread count
        "torchx_omp1": ["--env", "OMP_NUM_THREADS=1"],
    }
    figures = {way: {"end_to_end_s": [], "joined_s": [], "samples_per_s": []} for way in ways}
    for _ in range(REPEAT):
        for way, extra in ways.items():
            for script, args in (("train_dist.py", TORCHX_ARGS), ("join.py", "")):
                started = time.time()
                log = up_job(script, args) if extra is None else torchx_job(script, args, extra)
                if script == "join.py":
                    joined = float(re.search(r"joined ([0-9.]+)", log).group(1))
                    figures[way]["joined_s"].append(joined - started)
                else:
                    figures[way]["end_to_end_s"].append(time.time() - started)
                    figures[way]["samples_per_s"].append(samples_per_s(log))
    results["torchx"] = {
        way: {name: spread(values) for name, values in entry.items()}
        for way, entry in figures.items()
    }
    run(["docker", "network", "rm", "torchx"], check=False)  # TorchX's own, made by these runs


def up_job(script, args):
    """`make up` as a user runs it, 2 nodes x 1 CPU, from a fresh checkpoint folder."""
    shutil.rmtree(PROJECT / "checkpoints" / "torchx", ignore_errors=True)
    args = f"{args} --checkpoint-dir /checkpoints/torchx" if script == "train_dist.py" else args
    limits = ["NODES=2", "CPUS=1", "MEMORY=2G"]
    limits.append(f"ENV_IMAGE={ENV_IMAGE}")  # .env's would win over the environment's
    out = run(["make", "--no-print-directory", "up", *limits, f"SCRIPT={script}", f"ARGS={args}"])
    compose("down", "--remove-orphans")
    return out.stdout


def torchx_job(script, args, extra):
    """TorchX's command for the same job; its containers are removed after."""
    command = [
        str(TEMPLATE / ".venv" / "bin" / "torchx"),
        "run",
        "-s",
        "local_docker",
        "--wait",
        "--log",
        "--workspace",
        "",
        "dist.ddp",
        "-j",
        "2x1",
        "--image",
        "ddp-bench:latest",
        "--script",
        script,
        "--cpu",
        "1",
        "--memMB",
        "2048",
        *extra,
        "--",
        *args.split(),
    ]
    out = run(command)
    app = re.search(r"local_docker://torchx/(\S+)", out.stdout + out.stderr).group(1)
    label = f"label=torchx.pytorch.org/app-id={app}"
    ids = run(["docker", "ps", "-aq", "--filter", label]).stdout.split()
    if ids:
        run(["docker", "rm", "--force", *ids])
    return out.stdout + out.stderr


def setup():
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cookiecutter",
            "--no-input",
            "-o",
            str(WORK),
            str(TEMPLATE),
            "project=ddp-bench",
        ],
        check=True,
        capture_output=True,
    )
    for name in ("join.py", "collectives.py", "minimal_ddp.py", "sync_vote.py"):
        shutil.copy(HERE / name, PROJECT / name)
    run(["make", "dirs"])
    run(["make", "build", f"ENV_IMAGE={ENV_IMAGE}"])


def machine():
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "docker": run(["docker", "version", "-f", "{{.Server.Version}}"]).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main():
    setup()
    results = {"machine": machine(), "repeat": REPEAT, "startup_s": {}, "scaling": {}}
    steps = (
        bench_startup,
        bench_overhead,
        bench_loop,
        bench_scaling,
        bench_collectives,
        bench_rebuild,
        bench_elastic,
        bench_torchx,
    )
    # BENCH_ONLY=startup,overhead re-measures those and keeps the other recorded figures.
    only = [name for name in os.environ.get("BENCH_ONLY", "").split(",") if name]
    if only and RESULTS.exists():
        kept = json.loads(RESULTS.read_text())
        kept["machine"] = results["machine"]
        results = kept
    try:
        for step in steps:
            name = step.__name__.removeprefix("bench_")
            if only and name not in only:
                continue
            print(f"bench: {name} ...", flush=True)
            step(results)
            results.setdefault("repeats", {})[name] = REPEAT
    finally:
        # Containers, network and every image of the project, the untagged ones of rebuilds too.
        run(["make", "clean"], check=False)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    from report import write_report

    print(write_report(results, HERE))
    ratio = results["overhead"]["ratio"]
    if ratio < 0.8:
        sys.exit(f"bench: FAR OFF TARGET: container/host throughput ratio {ratio:.2f} < 0.8")


if __name__ == "__main__":
    main()
