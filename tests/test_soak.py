"""A short `make soak` on the host: the generated project's 2-process torchrun job, 20 times in a
row, exits 0 every time with no stack trace or abort (it used to abort after training in 2 to
5 runs of 40). `make soak` runs 200 and records the figures in bench/results.*."""

import sys

from helpers import TEMPLATE, sh


def test_twenty_host_jobs_in_a_row_finish_cleanly():
    soak = [sys.executable, TEMPLATE / "bench" / "soak.py", "--host-runs=20", "--up-runs=0"]
    out = sh(soak, timeout=1800).stdout
    assert "soak host: 20 runs, 0 non-zero exits, 0 with a stack trace" in out, out[-3000:]
