"""torchrun for a node: import torch first, then (on a worker) wait for the master, then run.

Importing torch takes seconds of CPU on a node's share of a machine (3.5 s with one CPU on the
template's 2-core bench machine). A worker that waited for the master's rendezvous port before
starting torchrun would begin its import only when the master had finished its own; importing
first overlaps them. The wait is docker/wait-for-master.sh, bounded, with a message naming the
master.

The node exits with the status of its training processes (2 for a usage or data error, 128+N
for signal N), and three things differ from plain torchrun; README's "Exit codes" says why:
- exit code 2 from a training process is not restarted: a usage error fails the same way again;
- a worker leaves the rendezvous without closing it: its state lives in the master's store, which
  ends with the master, and a close after that printed a connection error to a finished job;
- the status is written to the restart marker, so that a worker container restarted by Docker
  after a usage error does not start the job again.
"""

import logging
import os
import subprocess
import sys

# sys.path[0] is this folder; with --run-path the training script runs in this interpreter and
# should see its own folder first (launch.sh puts it on PYTHONPATH), as `python script.py` would.
HERE = sys.path.pop(0)

# The seconds-long import of torch.
from torch.distributed.elastic.agent.server.local_elastic_agent import (  # noqa: E402
    LocalElasticAgent,
)
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (  # noqa: E402
    DynamicRendezvousHandler,
)
from torch.distributed.run import main  # noqa: E402

USAGE_ERROR = 2  # argparse's exit status, and train_dist.py's for data and folder errors
MARKER = os.environ.get("NODE_MARKER", "/tmp/.node-started")  # written by entrypoint.sh
_monitor_workers = LocalElasticAgent._monitor_workers


# Both replace private methods of torch's elastic agent (torch is pinned in environment.yml);
# tests/test_launch.py fails if a torch upgrade changes them.
def monitor_without_retrying_usage_errors(agent, worker_group):
    result = _monitor_workers(agent, worker_group)
    if result.is_failed() and any(f.exitcode == USAGE_ERROR for f in result.failures.values()):
        agent._remaining_restarts = 0
    return result


def leave_without_closing(handler):
    handler._stop_heartbeats()
    return True


class WithoutTraceback(logging.Filter):
    """torchrun logs a process that exited with the agent's own traceback, which says nothing
    about the script; the line that names the process and its exit code stays."""

    def filter(self, record):
        record.exc_info = record.exc_text = None
        return True


def exit_status(error):
    """The status of the process that failed first: its exit code, or 128+N for signal N."""
    _, failure = error.get_first_failure()
    code = failure.exitcode
    return code if code > 0 else 128 - code if code < 0 else 1


def run():
    LocalElasticAgent._monitor_workers = monitor_without_retrying_usage_errors
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(WithoutTraceback())
    if os.environ.get("NODE_ROLE", "master") != "master":
        DynamicRendezvousHandler.shutdown = leave_without_closing
        waited = subprocess.run([os.path.join(HERE, "wait-for-master.sh")])
        if waited.returncode != 0:
            return waited.returncode
    sys.argv[0] = "torchrun"
    try:
        main()
        return 0
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        status = exit_status(error)
        reason = "a usage or data error: not restarted" if status == USAGE_ERROR else "failed"
        print(f"torchrun: rank {rank} exited with status {failure.exitcode} ({reason})", flush=True)
        return status


if __name__ == "__main__":
    status = run()
    if os.path.exists(MARKER):
        with open(MARKER, "w") as marker:
            marker.write(f"{status}\n")
    sys.exit(status)
