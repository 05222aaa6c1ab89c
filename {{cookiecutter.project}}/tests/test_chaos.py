"""`make chaos`'s verdict (tools/chaos.py): each way a chaos run can fail is reported as one; a
run that kept every promise passes. The run itself is the template's container test."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chaos", ROOT / "tools" / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)

NODES, EPOCHS = 3, 3
BOUND = chaos.repeat_bound(NODES)  # 20 steps x 32 samples x 4 nodes
CLEAN = [(1, 20000, 0, 0), (2, 20000, 0, 0), (3, 20000, 0, 0)]


def test_a_run_that_kept_every_promise_passes():
    assert BOUND == 2560
    assert chaos.verdict(0, CLEAN, kills=[], epochs=EPOCHS, nodes=NODES, loads=True) == []
    # A kill in epoch 2 may repeat up to the bound there, and in epoch 3 (it came before the
    # first step of that one).
    repeats = [(1, 20000, 0, 0), (2, 20000, 0, BOUND), (3, 20000, 0, BOUND)]
    assert chaos.verdict(0, repeats, kills=[2], epochs=EPOCHS, nodes=NODES, loads=True) == []


@pytest.mark.parametrize(
    "status, rows, kills, loads, failure",
    [
        (1, CLEAN, [], True, "make up exited 1"),
        (0, CLEAN[:2], [], True, "2 of 3 epochs have sample records"),
        (0, [*CLEAN[:2], (3, 19990, 10, 0)], [], True, "epoch 3: 10 samples never trained"),
        (0, [CLEAN[0], (2, 20000, 0, 1), CLEAN[2]], [], True, "epoch 2: 1 samples trained twice"),
        (0, [CLEAN[0], (2, 20000, 0, BOUND + 1), CLEAN[2]], [2], True, "(at most 2560)"),
        (0, [*CLEAN[:2], (3, 20000, 0, 1)], [1], True, "epoch 3: 1 samples trained twice"),
        (0, CLEAN, [], False, "the last checkpoint does not resume to the end"),
    ],
    ids=["status", "epochs", "missing", "repeat-no-kill", "repeat-over-bound", "far-kill", "load"],
)
def test_each_broken_promise_fails_the_run_and_says_which(status, rows, kills, loads, failure):
    failures = chaos.verdict(status, rows, kills, epochs=EPOCHS, nodes=NODES, loads=loads)
    assert len(failures) == 1 and failure in failures[0], failures
