"""torchrun for a node: import torch first, then (on a worker) wait for the master, then run.

Importing torch takes seconds of CPU on a node's share of a machine (3.5 s with one CPU on the
template's 2-core bench machine). A worker that waited for the master's rendezvous port before
starting torchrun would begin its import only when the master had finished its own; importing
first overlaps them. The wait is docker/wait-for-master.sh, bounded, with a message naming the
master.
"""

import os
import subprocess
import sys

# sys.path[0] is this folder; with --run-path the training script runs in this interpreter and
# should see its own folder first (launch.sh puts it on PYTHONPATH), as `python script.py` would.
HERE = sys.path.pop(0)

from torch.distributed.run import main  # noqa: E402  (the seconds-long import)

if __name__ == "__main__":
    if os.environ.get("NODE_ROLE", "master") != "master":
        waited = subprocess.run([os.path.join(HERE, "wait-for-master.sh")])
        if waited.returncode != 0:
            sys.exit(waited.returncode)
    sys.argv[0] = "torchrun"
    main()
