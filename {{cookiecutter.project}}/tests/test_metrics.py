import json

import pytest
import torch

from {{ cookiecutter.package }}.logs import clock, progress
from {{ cookiecutter.package }}.metrics import MetricsLog, Sums, describe
from {{ cookiecutter.package }}.plot import plot


def test_metrics_log_writes_json_lines_and_tensorboard_events(tmp_path):
    metrics = MetricsLog(tmp_path)
    metrics.record(1, 2, {"loss": 2.0, "accuracy": 0.1, "samples_per_s": 100.0}, 100)
    metrics.record(1.5, 2, {"val_loss": 1.5}, 150, midway=True)
    metrics.record(2, 2, {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.2}, 200)
    metrics.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["epoch"], r["trained"], r.get("loss")) for r in rows] == [
        (1, 100, 2.0),
        (1.5, 150, None),
        (2, 200, 1.0),
    ]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_only_rank_0_writes(tmp_path):
    MetricsLog(tmp_path, enabled=False).record(1, 1, {"loss": 1.0}, 10)
    assert not list(tmp_path.iterdir())


def test_the_log_line_puts_loss_first_and_validation_after_training():
    values = {"accuracy": 0.5, "val_accuracy": 0.25, "val_loss": 1.5, "loss": 1.0}
    values.update(samples_per_s=1234.4, world_size=2)
    assert describe(values) == (
        "loss 1.0000 accuracy 0.5000 val_loss 1.5000 val_accuracy 0.2500 samples/s 1234"
    )


def test_sums_add_tensors_and_numbers_in_one_process():
    sums = Sums(torch.device("cpu"))
    for _ in range(3):
        sums.add("loss", torch.tensor(2.0))
        sums.add("samples", 4)
    sums.add("correct", torch.tensor([True, False, True]).sum())
    assert sums.over_ranks() == {"loss": 6.0, "samples": 12.0, "correct": 2.0}


def test_sums_add_batch_weighs_each_mean_loss_by_its_samples():
    sums = Sums(torch.device("cpu"))
    sums.add_batch(torch.tensor(1.0), 3, {"correct": torch.tensor(2)})
    sums.add_batch(torch.tensor(3.0), 1, {"correct": torch.tensor(1)})
    totals = sums.over_ranks()
    assert totals == {"loss": 6.0, "samples": 4.0, "correct": 3.0}
    assert totals["loss"] / totals["samples"] == 1.5  # not (1 + 3) / 2


def test_plot_writes_a_png_with_a_panel_for_each_metric(tmp_path, monkeypatch):
    source = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "loss": 1 / e, "accuracy": e / 4, "val_perplexity": e} for e in (1, 2)]
    source.write_text("\n".join(json.dumps(r) for r in rows))
    shown = []
    real_subplots = plot.__globals__["plt"].subplots
    monkeypatch.setattr(
        plot.__globals__["plt"],
        "subplots",
        lambda rows, cols, **kw: shown.append(cols) or real_subplots(rows, cols, **kw),
    )
    png = plot(source, tmp_path / "metrics.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert shown == [3]  # loss, accuracy, perplexity


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
