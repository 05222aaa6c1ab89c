"""The benchmark's report turns results into a Markdown table and a PNG (no Docker needed)."""

import sys

from helpers import TEMPLATE

sys.path.insert(0, str(TEMPLATE / "bench"))
from report import write_report  # noqa: E402


def spread(median):
    return {"median": median, "min": median * 0.9, "max": median * 1.1, "runs": [median]}


RESULTS = {
    "machine": {"cores": 2, "memory_gib": 23.4, "docker": "20.10.24", "date": "2026-11-26"},
    "repeat": 3,
    "startup_s": {
        "2_nodes": spread(3.1),
        "4_nodes": spread(4.2),
        "4_nodes_phases": {"containers_started": 2.5, "workers_imported": 8.25},
        "4_nodes_spawn": spread(16.0),
        "import_torch_1_cpu": spread(3.5),
        "import_torch_0.5_cpu": spread(7.0),
        "seed_pattern_2_nodes": spread(14.0),
    },
    "overhead": {
        "host_samples_per_s": spread(2600.0),
        "container_samples_per_s": spread(2550.0),
        "ratio": 0.98,
    },
    "loop": {
        "generic_samples_per_s": spread(7000.0),
        "minimal_samples_per_s": spread(7200.0),
        "ratio": 0.97,
        "ratios": {**spread(0.97), "pairs": 10},
    },
    "stop_vote": {
        "async_samples_per_s": spread(7100.0),
        "sync_samples_per_s": spread(7000.0),
        "ratio": 1.01,
        "ratios": {**spread(1.01), "pairs": 10},
    },
    "threads": {
        "from_cgroup_limit_samples_per_s": spread(2550.0),
        "from_host_cores_2_samples_per_s": spread(1900.0),
    },
    "scaling": {
        "1_nodes": {"cpus_per_node": 2.0, "samples_per_s": spread(2000.0)},
        "2_nodes": {
            "cpus_per_node": 1.0,
            "samples_per_s": spread(2500.0),
            "grad_allreduce_ms": 0.4,
            "step_ms": 50.0,
        },
    },
    "allreduce_gbit_per_s": {
        str(4096 * 4**i): {"docker_bridge": 1.0 + i, "host_loopback": 2.0 + i} for i in range(8)
    },
    "rebuild_s": {"cold_runtime_stage": spread(6.0), "code_only": spread(0.8)},
    "runtime_stage_adds_mb": 0.4,
    "elastic_s": {"leave": spread(5.0), "scale_up": spread(8.0), "scale_down": spread(6.0)},
    "torchx": {
        way: {
            "end_to_end_s": spread(seconds),
            "joined_s": spread(seconds / 3),
            "samples_per_s": spread(rate),
        }
        for way, seconds, rate in (
            ("make_up", 10.0, 5300.0),
            ("torchx", 17.0, 2100.0),
            ("torchx_omp1", 11.0, 5500.0),
        )
    },
}


def test_report_writes_a_table_and_a_plot(tmp_path):
    summary = write_report(RESULTS, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| start-up, 4 nodes x 0.5 CPU (s) | 4.20 (3.78–4.62) | < 5 |" in table
    assert "| - of which: last node had imported torch (s) | 8.25 | |" in table
    assert "0.5 CPU: the floor of a 4-node start-up (s) | 7.00 (6.30–7.70) |" in table
    assert "| container / host throughput | 0.980 | >= 0.95 |" in table
    assert (
        "| generic / minimal loop throughput, median of 10 interleaved pairs "
        "(0.97 (0.87–1.07)) | 0.970 | >= 0.97 |" in table
    )
    assert "| asynchronous / synchronous stop vote throughput, median of 10" in table
    assert "| 1.010 | >= 1 |" in table
    assert "| 64 KB |" in table and "| 65536 KB |" in table
    assert "to training again on 2 nodes (3-node job) (s) | 5.00 (4.50–5.50) | < 10 |" in table
    assert "TorchX `dist.ddp` on local_docker, as shipped" in table
    assert "| 17.00 (15.30–18.70) / 5.67 (5.10–6.23) / 2100.00 (1890.00–2310.00) |" in table
    assert "start-up" in summary
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
