"""The exit codes a job's processes agree on, and the error that ends a job a restart cannot fix.

Read by the training loop (train_dist.py) and by the launcher (launcher/), which must not import
torch to know them: this module imports nothing.
"""

# argparse's status for a bad argument; also every rank's for a UsageError. The launcher never
# restarts it: it would fail the same way (docs/exit-codes.md).
USAGE_ERROR = 2
# The status of the ranks that stopped because another rank was asked to (a node left): torchrun
# re-forms the job without that node and counts no failure.
PEER_STOPPED = 75


class UsageError(Exception):
    """Something a restart cannot fix (a folder that cannot be used, a task that does not import,
    a checkpoint that cannot be read, a setting that contradicts the checkpoint): every rank exits
    with USAGE_ERROR; the message, printed by the rank that found it, says why (empty on the
    others)."""
