"""`make chaos`'s verdict (tools/chaos.py): each way a chaos run can fail is reported as one; a
run that kept every promise passes. The run itself is the template's container test."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chaos", ROOT / "tools" / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)

EPOCHS = 3
CLEAN = [(1, 20000, 0, 0), (2, 20000, 0, 0), (3, 20000, 0, 0)]


def test_a_run_that_kept_every_promise_passes():
    assert chaos.verdict(0, CLEAN, kills=[2, 3], epochs=EPOCHS, loads=True) == []


@pytest.mark.parametrize(
    "status, rows, kills, loads, failure",
    [
        (1, CLEAN, [], True, "make up exited 1"),
        (0, CLEAN[:2], [], True, "2 of 3 epochs have sample records"),
        (0, [*CLEAN[:2], (3, 19990, 10, 0)], [], True, "epoch 3: 10 samples never trained"),
        (0, [CLEAN[0], (2, 20000, 0, 1), CLEAN[2]], [], True, "epoch 2: 1 samples trained twice"),
        # A kill trains nothing twice: its peers save the last step they finished.
        (0, [CLEAN[0], (2, 20000, 0, 1), CLEAN[2]], [2], True, "(1 kills near)"),
        (0, CLEAN, [], False, "the last checkpoint does not resume to the end"),
    ],
    ids=["status", "epochs", "missing", "repeat-no-kill", "repeat-after-a-kill", "load"],
)
def test_each_broken_promise_fails_the_run_and_says_which(status, rows, kills, loads, failure):
    failures = chaos.verdict(status, rows, kills, epochs=EPOCHS, loads=loads)
    assert len(failures) == 1 and failure in failures[0], failures
