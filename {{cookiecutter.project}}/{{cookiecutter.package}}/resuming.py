"""Where a round starts: the newest checkpoint any node holds, whatever disks they share.

Any node may hold rank 0, so no one machine's folder can be the job's record: were rank 0 alone
to read and write, machine B's rank 0 would find its own folder empty after machine A's left,
and train again from the start. So every distinct checkpoint folder of the job is written at
each save, by the lowest rank that writes there (checkpoint.Saver), and at the start of every
round the ranks agree on the newest checkpoint any folder holds (its position, then a hash of
its content); the rank that holds it sends its bytes, every rank decodes them as
torch.load(weights_only=True) does, and the folders that were behind store them, with the
sender's best.pt.

Which ranks share a folder (one host, NFS, a ReadWriteMany claim) is found out each round, not
configured: each rank leaves a file named for the round and itself, and looks for those of
lower ranks beside it.

Cost (docs/checkpoints.md): a save writes the checkpoint once in each distinct folder; a round
that finds a folder behind sends the newest checkpoint (and best.pt where it differs) to every
rank once and writes it there.
"""

import logging
import os
import secrets
from pathlib import Path
from typing import NamedTuple

from {{ cookiecutter.package }} import checkpoint, distributed
from {{ cookiecutter.package }}.checkpoint import BEST, CheckpointError
from {{ cookiecutter.package }}.errors import UsageError

log = logging.getLogger(__name__)
MID_EPOCH = (
    "it stopped mid-epoch, and only the same set can finish that epoch with each sample once."
    " Resume with the same data (and --samples), or start afresh (make fresh-start, or another"
    " --checkpoint-dir)"
)


class Folder(NamedTuple):
    writes: bool = True  # this rank writes its folder: no lower rank's file is beside its own
    folders: int = 1  # distinct checkpoint folders in the job
    round: int = 0  # a random number of this round, the same on every rank (sample_log.py)


def find_folders(directory) -> Folder:
    """Which ranks write where: a collective, so at the same point on every rank."""
    if distributed.env_rank() < 0:
        return Folder(round=secrets.randbits(63))
    directory, rank = Path(directory), distributed.env_rank()
    # A fresh name each round: a file an earlier round left behind (a kill) is no one's now.
    token = int.from_bytes(distributed.broadcast_bytes(secrets.token_bytes(8), src=0)[:8], "big")
    token >>= 1  # 63 bits: it travels as an int64 too
    probe = f".probe-{token:016x}-" + "{}"
    with distributed.fail_together():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / probe.format(rank)).touch()
        except OSError as err:
            raise UsageError(f"cannot write in {directory}: {err.strerror or err}") from None
    # fail_together's vote is a barrier: every rank's file is there now.
    lower = any((directory / probe.format(r)).exists() for r in range(rank))
    writers = distributed.gather_ints([int(not lower)])  # and a barrier: every rank looked
    (directory / probe.format(rank)).unlink(missing_ok=True)
    if not lower:
        for old in directory.glob(".probe-*"):
            if not old.name.startswith(probe.format("")):
                old.unlink(missing_ok=True)
        for claim in directory.glob(".rescue-*"):  # the last round's (checkpoint.Saver.rescue)
            claim.unlink(missing_ok=True)
    return Folder(writes=not lower, folders=sum(row[0] for row in writers), round=token)


def agree(directory, folder, keep, rank):
    """(state, path in this rank's folder, who sent it): the newest checkpoint any folder holds,
    stored in this rank's folder if it writes there and was behind; (None, None, "") if none."""
    state, path, data, best_data = None, None, None, None
    best = Path(directory) / BEST
    with distributed.fail_together():
        if folder.writes:
            state, path, data = checkpoint.newest(directory)
            best_data = best.read_bytes() if best.is_file() else None
    where = checkpoint.position(path) if path else (0, 0)
    row = [int(folder.writes), int(path is not None), *where, _hash(data)]
    rows = distributed.gather_ints([*row, int(best_data is not None), _hash(best_data)])
    sent_by = distributed.gather([os.uname().nodename, path.name if path else ""])
    hosts, names = [host for host, _ in sent_by], [name for _, name in sent_by]
    held = [r for r, (_, has, *_) in enumerate(rows) if has]
    if not held:
        return None, None, ""
    newest = max(tuple(rows[r][2:4]) for r in held)
    at = [r for r in held if tuple(rows[r][2:4]) == newest]
    differ = [r for r in at if rows[r][4] != rows[at[0]][4]]
    name = names[at[0]]
    if not checkpoint.NAME_RE.match(name):  # a file name, never a path, whoever sent it
        raise CheckpointError(f"rank {at[0]} sent {name!r}, not a checkpoint's name")
    if differ:
        a, b = at[0], differ[0]
        raise CheckpointError(
            f"two different checkpoints are both {name}: rank {a}'s on {hosts[a]} and rank {b}'s"
            f" on {hosts[b]}. They come from different runs: move one of those folders aside "
            "and start again"
            if rank == 0
            else ""
        )
    holder = at[0]
    sent = distributed.broadcast_bytes(data if rank == holder else b"", src=holder)
    whose = f"rank {holder}'s folder on {hosts[holder]}"
    if rank != holder:
        state = decode(sent, whose)
    behind = folder.writes and (path is None or checkpoint.position(path) != newest)
    _store(sent if behind else None, Path(directory) / name, keep)
    if rows[holder][5] and any(w and h != rows[holder][6] for w, *_, h in rows):
        best_sent = distributed.broadcast_bytes(best_data if rank == holder else b"", src=holder)
        fresh = folder.writes and _hash(best_data) != rows[holder][6]
        _store(best_sent if fresh else None, best, keep=None)
    return state, Path(directory) / name, whose


def _hash(data):
    return checkpoint.content_hash(data) if data else 0


def _store(data, path, keep):
    with distributed.fail_together():
        if data is not None:
            checkpoint.write(data, path)
            if keep:
                checkpoint.prune(path.parent, keep)
    distributed.wait_for_all()


def decode(data, whose):
    """A peer's checkpoint bytes as torch.load(weights_only=True) decodes them: a sender that
    is not what it claims (docs/security.md) cannot run code here."""
    try:
        return checkpoint.decode(data)
    except Exception as err:  # noqa: BLE001 - whatever it is, it is not a checkpoint to train on
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"the checkpoint sent from {whose} does not decode as torch.load(weights_only=True)"
            f" decodes: {reason}"
        ) from None


def resume(directory, model, stepper, *, rank, keep, seed, size, samples_per_step, better):
    """Find which ranks write which folders, agree on the newest checkpoint, load it into every
    rank's model and step; refuse one that this job cannot go on from (another --seed, or
    another training set mid-epoch, or another model); return (where to go on from: Resumed,
    this rank's Folder). The best value so far is best.pt's where that is better than the
    checkpoint's (a stop between the two saves): `better(new, old)`."""
    folder = find_folders(directory)
    state, path, whose = agree(directory, folder, keep, rank)
    with distributed.fail_together(once=True):
        try:
            resumed = checkpoint.restore(state, model, stepper.optimizer, samples_per_step)
        except CheckpointError as err:  # every rank finds it: rank 0 says it
            raise CheckpointError(f"{path}: {err}" if rank == 0 else "") from None
        stepper.load_state_dict(state)
        kept = checkpoint.best_value(directory)  # the agreed best.pt is in every folder now
    if kept is not None and (resumed.best is None or better(kept, resumed.best)):
        resumed = checkpoint.Resumed(*resumed[:4], best=kept, size=resumed.size)
    if resumed.seed not in (None, seed):
        # The epoch's order comes from the seed: another one would train some samples twice.
        message = (
            f"{path} was trained with --seed {resumed.seed}: resume with it, or start afresh "
            "(make fresh-start)"
        )
        raise UsageError(message if rank == 0 else "")
    if resumed.size not in (None, size):
        changed = f"{path} was trained on {resumed.size} samples an epoch; there are {size}"
        if resumed.samples:
            # Which samples the epoch's first part held depends on its size: the rest of it
            # would train some twice and miss others.
            raise UsageError(f"{changed}: {MID_EPOCH}" if rank == 0 else "")
        log.warning("%s: the next epoch deals the new set", changed)
    if path:
        done = f"epoch {resumed.epoch} done, {resumed.samples} samples into the next"
        log.info("resumed from %s: %s (from %s)", path, done, whose)
    return resumed, folder
