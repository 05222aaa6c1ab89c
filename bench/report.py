"""Turn bench results into a Markdown table and a PNG plot; return a short summary."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(entry, unit=""):
    return f"{entry['median']:.2f}{unit} ({entry['min']:.2f}–{entry['max']:.2f})"


def _pair_rows(entry, first, second, ratio, target):
    """The rows of a comparison of two host jobs run turn about (bench.py's `interleaved`):
    each side's samples/s, then the median of the pairs' ratios."""
    rows = [
        f"| host, 2 pinned processes: {label} (samples/s) | "
        f"{_fmt(entry[f'{key}_samples_per_s'])} | |"
        for key, label in (first, second)
    ]
    pairs = f"median of {entry['ratios']['pairs']} interleaved pairs ({_fmt(entry['ratios'])})"
    return [*rows, f"| {ratio}, {pairs} | {entry['ratio']:.3f} | {target} |"]


def write_report(r, folder):
    m = r["machine"]
    # Rows re-measured on their own (BENCH_ONLY) may have been repeated another number of times.
    other = [f"{k} rows: {n}" for k, n in r.get("repeats", {}).items() if n != r["repeat"]]
    rows = [
        f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Docker {m['docker']}, {m['date']}; "
        f"median (min–max) of {r['repeat']} runs{' (' + ', '.join(other) + ')' if other else ''}.",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
    ]
    s = r["startup_s"]
    rows += [
        f"| start-up, 2 nodes x 1 CPU (s) | {_fmt(s['2_nodes'])} | |",
        f"| start-up, 4 nodes x 0.5 CPU (s) | {_fmt(s['4_nodes'])} | < 5 |",
    ]
    if "4_nodes_phases" in s:
        ph = s["4_nodes_phases"]
        rows += [
            f"| - of which: last container started (s) | {ph['containers_started']:.2f} | |",
            f"| - of which: last node had imported torch (s) | {ph['workers_imported']:.2f} | |",
            f"| start-up, 4 nodes, `START_METHOD=spawn` (two imports per node) (s) | "
            f"{_fmt(s['4_nodes_spawn'])} | |",
            f"| `import torch` in the image, 1 CPU (s) | {_fmt(s['import_torch_1_cpu'])} | |",
            f"| `import torch` in the image, 0.5 CPU: the floor of a 4-node start-up (s) | "
            f"{_fmt(s['import_torch_0.5_cpu'])} | |",
        ]
    rows.append(
        f"| start-up, seed's pattern (`sleep 10`, static ranks), 2 nodes (s) | "
        f"{_fmt(s['seed_pattern_2_nodes'])} | > 10 by construction |"
    )
    o = r["overhead"]
    rows += [
        f"| host torchrun, 2 processes (samples/s) | {_fmt(o['host_samples_per_s'])} | |",
        f"| containers, 2 nodes x 1 CPU (samples/s) | {_fmt(o['container_samples_per_s'])} | |",
        f"| container / host throughput | {o['ratio']:.3f} | >= 0.95 |",
    ]
    if "loop" in r:
        rows += _pair_rows(
            r["loop"],
            ("generic", "the generic loop, `train_dist.py`"),
            ("minimal", "a minimal hand-written DDP loop"),
            "generic / minimal loop throughput",
            ">= 0.97",
        )
    if "stop_vote" in r:
        rows += _pair_rows(
            r["stop_vote"],
            ("async", "stop vote read a step later"),
            ("sync", "stop vote read in its step, as before"),
            "asynchronous / synchronous stop vote throughput",
            ">= 1",
        )
    for name, entry in r["threads"].items():
        rows.append(
            f"| threads {name.replace('_samples_per_s', '')} (samples/s) | {_fmt(entry)} | |"
        )
    for name, entry in r["scaling"].items():
        extra = ""
        if "grad_allreduce_ms" in entry:
            extra = (
                f"; gradient all-reduce {entry['grad_allreduce_ms']:.2f} ms "
                f"of a {entry['step_ms']:.1f} ms step"
            )
        rows.append(
            f"| scaling {name.replace('_', ' ')} x {entry['cpus_per_node']:.2f} CPU (samples/s) | "
            f"{_fmt(entry['samples_per_s'])}{extra} | |"
        )
    b = r["rebuild_s"]
    rows += [
        f"| rebuild after a code-only change (s) | {_fmt(b['code_only'])} | < 10 |",
        f"| cold build of the runtime stage (s) | {_fmt(b['cold_runtime_stage'])} | |",
        f"| size the runtime stage adds (MB) | {r['runtime_stage_adds_mb']:.1f} | |",
    ]
    elastic = r.get("elastic_s", {})
    again = "to training again on 2 nodes (3-node job)"
    for name, label, target in (
        ("kill", f"`docker kill` of rank 0's node {again}", "< 3"),
        ("leave", f"`docker stop` of rank 0's node {again}", "< 10"),
        ("scale_up", "`make scale NODES=3` to training on 3 nodes (from 2)", "< 5"),
        ("scale_up_started", "- of which the new node's start (container, `import torch`)", ""),
        ("scale_up_joined", "- of which its arrival at the rendezvous to training on 3", ""),
        ("scale_up_paused", "that join: training paused (the others' stop to training on 3)", ""),
        ("scale_down", "`make scale NODES=2` to training on 2 nodes (from 3)", ""),
    ):
        if name in elastic:
            rows.append(f"| {label} (s) | {_fmt(elastic[name])} | {target} |")
    if "elastic_repeated_per_kill" in r:
        repeated = _fmt(r["elastic_repeated_per_kill"])
        rows.append(f"| samples trained twice for that kill (no periodic save) | {repeated} | 0 |")
    peer = r.get("torchx", {})
    for way, label in (
        ("make_up", "`make up`"),
        ("torchx", "TorchX `dist.ddp` on local_docker, as shipped"),
        ("torchx_omp1", "TorchX, `--env OMP_NUM_THREADS=1`"),
    ):
        if way in peer:
            e = peer[way]
            rows.append(
                f"| peer, 2 nodes x 1 CPU, 2 epochs of 8192: {label}: end to end (s) / to rank 0 "
                f"joined (s) / training (samples/s) | {_fmt(e['end_to_end_s'])} / "
                f"{_fmt(e['joined_s'])} / {_fmt(e['samples_per_s'])} | |"
            )
    soak = r.get("soak", {})
    for name, label in (("host", "2-process host job"), ("up", "2-node `make up`")):
        if name in soak:
            e = soak[name]
            rows.append(
                f"| soak ({soak['date']}): {label}, non-zero exits / runs with a stack trace | "
                f"{e['non_zero_exits']} / {e['with_stack_trace']} of {e['runs']} runs | 0 / 0 |"
            )
    figures = rows[2:]
    rows += [
        "",
        "| all-reduce size | Docker bridge (Gbit/s) | host loopback (Gbit/s) |",
        "| --- | --- | --- |",
    ]
    sizes = sorted(r["allreduce_gbit_per_s"], key=int)
    for size in sizes:
        e = r["allreduce_gbit_per_s"][size]
        rows.append(
            f"| {int(size) // 1024} KB | {e['docker_bridge']:.2f} | {e['host_loopback']:.2f} |"
        )
    (folder / "results.md").write_text("\n".join(rows) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    kb = [int(size) / 1024 for size in sizes]
    for key, label in (("docker_bridge", "Docker bridge"), ("host_loopback", "host loopback")):
        left.plot(kb, [r["allreduce_gbit_per_s"][s][key] for s in sizes], marker="o", label=label)
    left.set(
        xscale="log",
        xlabel="message size (KB)",
        ylabel="all-reduce Gbit/s",
        title="gloo all-reduce, 2 ranks",
    )
    left.legend()
    nodes = [int(name.split("_")[0]) for name in r["scaling"]]
    right.plot(nodes, [e["samples_per_s"]["median"] for e in r["scaling"].values()], marker="o")
    right.set(
        xlabel="nodes (2 CPUs split between them)",
        ylabel="samples/s",
        title="scaling on one host",
        xticks=nodes,
    )
    fig.tight_layout()
    fig.savefig(folder / "results.png", dpi=100)
    return "\n".join(figures)
