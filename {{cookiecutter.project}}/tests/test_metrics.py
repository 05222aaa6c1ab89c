import json

import pytest

from {{ cookiecutter.package }}.logs import clock, progress
from {{ cookiecutter.package }}.metrics import MetricsLog
from {{ cookiecutter.package }}.plot import plot


def test_metrics_log_writes_json_lines_and_tensorboard_events(tmp_path):
    metrics = MetricsLog(tmp_path)
    metrics.record(1, 2, {"loss": 2.0, "accuracy": 0.1, "samples_per_s": 100.0})
    metrics.record(2, 2, {"loss": 1.0, "accuracy": 0.5, "samples_per_s": 100.0})
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["epoch"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.0)]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_only_rank_0_writes(tmp_path):
    MetricsLog(tmp_path, enabled=False).record(1, 1, {"loss": 1.0})
    assert not list(tmp_path.iterdir())


def test_plot_writes_a_png(tmp_path):
    source = tmp_path / "metrics.jsonl"
    source.write_text(
        "\n".join(json.dumps({"epoch": e, "loss": 1 / e, "accuracy": e / 4}) for e in (1, 2, 3))
    )
    png = plot(source, tmp_path / "metrics.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_plot_without_metrics_says_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no metrics yet"):
        plot(tmp_path / "metrics.jsonl", tmp_path / "out.png")


def test_progress_is_left_out_on_other_ranks_and_when_asked(monkeypatch):
    loader = [1, 2, 3]
    assert progress(loader, batches=None, epoch=0, epochs=1, every=0) is loader
    monkeypatch.setenv("RANK", "1")
    assert progress(loader, batches=None, epoch=0, epochs=1, every=30) is loader


def test_times_left_read_as_a_clock():
    assert [clock(s) for s in (5, 65, 3725)] == ["0:05", "1:05", "1:02:05"]


def test_plot_before_any_training_says_so(tmp_path):
    with pytest.raises(SystemExit, match="not found: train first"):
        plot(tmp_path / "metrics.jsonl", tmp_path / "out.png")
