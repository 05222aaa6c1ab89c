"""Checkpoints that survive a crash: written to a temporary file, fsynced, then renamed.

A reader never sees a half-written file under the final name. A failed write (a full disk)
leaves the previous checkpoint as it was and stops the job with a message (WriteError, status
2). A damaged file (truncated, or a record that fails its CRC) is moved aside, never deleted, so
the one before it is used and the bad one can be inspected. Any other failure to load (a read
error, memory, an object in the state that torch.load(weights_only=True) refuses, weights that do
not fit the task's model) stops the job with a message and changes no file: going back to an
older checkpoint, or to none, would silently undo training.

Names: ckpt-epoch0003.pt after 3 complete epochs; ckpt-epoch0003-sample00002560.pt when the job
stopped 2,560 samples into the 4th epoch (a graceful stop). Older mid-epoch checkpoints,
ckpt-epoch0003-step000040.pt, counted steps of the world size that wrote them; they still load.
best.pt: the state with the best validation metric the task names; `keep` never removes it and
a resume never starts from it.
"""

import hashlib
import io
import logging
import os
import pickle
import re
import signal
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from {{ cookiecutter.package }}.distributed import fail_together
from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.health import resting

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^ckpt-epoch(\d+)(?:-(?:sample|step)(\d+))?\.pt$")
BEST = "best.pt"
# The most a failed rank spends saving its last finished step before it exits (Saver.rescue):
# the others' next round waits for it, and torchrun ends a node's other ranks 30 s after the
# first one failed.
RESCUE_S = 15


class CheckpointError(UsageError):
    """A checkpoint that is there but cannot be used as it is; the message says what to do."""


def name(epoch: int, samples: int = 0) -> str:
    if samples == 0:
        return f"ckpt-epoch{epoch:04d}.pt"
    return f"ckpt-epoch{epoch:04d}-sample{samples:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def position(path) -> tuple[int, int]:
    """(epochs done, samples or steps into the next) of a checkpoint, from its name."""
    match = NAME_RE.match(Path(path).name)
    return int(match.group(1)), int(match.group(2) or 0)


def checkpoints(directory) -> list[Path]:
    """Complete checkpoints in the directory, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if NAME_RE.match(p.name)), key=position)


def content_hash(data: bytes) -> int:
    """A hash of what a checkpoint holds (63 bits), equal for two saves of the same state.

    Not of the file's bytes: torch.save writes a fresh serialization id into every archive, and
    names its records after the file. So: each record's name past the archive folder, size and
    CRC, read from the zip's own directory.
    """
    digest = hashlib.sha256()
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch's format before 1.6
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename.split("/", 1)[-1]):
            record = info.filename.split("/", 1)[-1]
            if record != ".data/serialization_id":
                digest.update(f"{record}:{info.file_size}:{info.CRC};".encode())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def save(state: dict, directory, epoch: int, samples: int = 0, keep: int = 3) -> Path:
    """Write state as the checkpoint of `samples` into epoch `epoch`; keep the newest `keep`."""
    final = write(state, Path(directory) / name(epoch, samples))
    prune(directory, keep)
    return final


def prune(directory, keep):
    for old in checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)


class WriteError(UsageError):
    """A checkpoint that could not be written (a full disk, a quota, a file size limit): every
    rank stops with status 2 rather than train on with nothing saved, or be restarted into the
    same wall; the previous checkpoints are as they were."""


def write(state, final: Path) -> Path:
    """Write state (a dict for torch.save, or a checkpoint's bytes) to `final` whole or not at
    all."""
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    # Its own name per writer: two nodes that did not find out they share the folder (a slow
    # network file system) each write a whole file, and the last rename wins.
    tmp = directory / f".{final.name}.{os.uname().nodename}-{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            if isinstance(state, bytes):
                f.write(state)
            else:
                torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
    # torch's zip writer reports a failed write as a RuntimeError ("unexpected pos ..."), not as
    # the OSError beneath it: both mean the bytes did not reach the disk.
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write checkpoint {final}: {_why(err, directory)}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _why(err, directory):
    """What stopped a write, in words a user can act on."""
    cause = err if isinstance(err, OSError) else err.__context__
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else None
    try:
        free = os.statvfs(directory)
        room = f"{free.f_bavail * free.f_frsize / 2**20:.0f} MiB free there"
    except OSError:
        room = "free space unknown"
    reason = reason or str(err).splitlines()[0]
    return (
        f"{reason} ({room}); the previous checkpoints are kept. Free some space, or point"
        " --checkpoint-dir elsewhere, and start again"
    )


def state(model, optimizer, position, metrics, best=None) -> dict:
    """What a checkpoint holds: enough to go on from `position` (EpochBatches.position) as if
    never stopped: the last epoch's metrics and the best validation value so far with it."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **position,
        "metrics": metrics,
        "best": best,
    }


class Resumed(NamedTuple):
    epoch: int = 0  # epochs done
    samples: int = 0  # into the next
    seed: int | None = None
    metrics: dict | None = None  # of the last epoch done
    best: float | None = None  # the monitored validation value of best.pt
    size: int | None = None  # training samples an epoch had (None: an older checkpoint)


def restore(state, model, optimizer, samples_per_step) -> Resumed:
    """Load a checkpoint's state into the model and optimizer; return where to go on from.

    An older checkpoint counted steps, not samples: its steps are taken to be of the current
    world size and batch size (`samples_per_step`), as the code that wrote it resumed them; it
    kept loss and accuracy as keys of their own.
    """
    if state is None:
        return Resumed()
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        # Another model or optimizer than the one that trained it (another --hidden, a layer
        # more): a restart would fail the same way.
        lines = [line.strip().rstrip(".") for line in str(err).splitlines() if line.strip()]
        if lines and lines[0].startswith("Error(s) in loading"):
            lines = lines[1:]  # torch's heading; the lines below it say what differs
        detail = "; ".join(lines[:2]) + ("; ..." if len(lines) > 2 else "")
        raise CheckpointError(
            f"the checkpoint does not fit the task's model or optimizer ({detail}): it was "
            "trained with other settings or another model. Start afresh (make fresh-start), or "
            "point --checkpoint-dir elsewhere"
        ) from None
    metrics = state.get("metrics")
    if "metrics" not in state and state.get("loss") is not None:
        metrics = {"loss": state["loss"], "accuracy": state["accuracy"]}
    samples = state.get("samples", state.get("step", 0) * samples_per_step)
    best, size = state.get("best"), state.get("size")
    return Resumed(state["epoch"], samples, state.get("seed"), metrics, best, size)


def best_value(directory):
    """The monitored value best.pt was saved for, or None (no best.pt, or one that does not
    load). Memory-mapped: only the record of numbers is read, not the weights."""
    path = Path(directory) / BEST
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("best")
    except Exception as err:  # noqa: BLE001 - a best.pt that does not load holds no best
        log.warning("%s does not load (%s): the next better value replaces it", path, err)
        return None


def load_latest(directory):
    """Return (state, path) of the newest checkpoint that loads, or (None, None). A truncated
    or corrupt file is set aside; anything else raises CheckpointError."""
    state, path, _ = newest(directory)
    return state, path


def decode(data: bytes):
    """A checkpoint's state from its bytes, as torch.load(weights_only=True) decodes: tensors,
    numbers, strings and containers, never code."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def newest(directory):
    """(state, path, bytes) of the newest checkpoint that loads, or (None, None, None); as
    load_latest."""
    for path in reversed(checkpoints(directory)):
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(
                f"cannot read {path} ({err.strerror or err}): fix the file or its folder "
                "(permissions, the disk), or move it away to resume from the one before"
            ) from None
        try:
            return decode(data), path, data
        except Exception as err:  # noqa: BLE001 - which of them, the archive itself says
            if not _whole_archive(data):  # truncated or damaged: the one before is used
                _set_aside(path, err)
                continue
            # Whole, yet it does not load: memory, or an object the safe unpickler refuses.
            # Going back to an older checkpoint would silently undo training: stop, change
            # nothing.
            raise CheckpointError(f"{path} does not load: {_load_failure(err)}") from None
    return None, None, None


def _load_failure(err):
    """Why a whole checkpoint did not load, and what to do, in one line."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
        return (
            "it holds an object that torch.load(weights_only=True) refuses"
            f"{': ' + reason.split('. Please')[0] if reason else ''}. Keep tensors, numbers, "
            "strings, lists and dicts in the state (state_dict() of the object), or allow the "
            "class in the task with torch.serialization.add_safe_globals([...])"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, MemoryError) or "alloc" in text.lower():
        return f"{first}. Give the node more memory (MEMORY) and start again; nothing was changed"
    return f"{type(err).__name__}: {first}. Nothing was changed"


def _whole_archive(data: bytes):
    """Whether a checkpoint's bytes are a zip archive whose every record matches its CRC."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
    except MemoryError:
        return True  # cannot tell: never set a checkpoint aside on a guess


def _set_aside(path, err):
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log.warning("checkpoint %s does not load (%s); moved to %s", path, err, aside.name)


class Saver:
    """A run's checkpoints, written in each distinct checkpoint folder of the job by one rank
    there (`enabled`: DDP keeps the weights equal on every rank, so each writes its own copy,
    and no folder depends on another machine's; resuming.py): at the end of each epoch, every
    `every` steps into one (0: never), where a stop left off, and best.pt when validation
    improves on the best so far. `batches` (dealing.EpochBatches) says where training stands;
    `stepper` (steps.Stepper) holds the optimizer and the step's own state."""

    def __init__(
        self, directory, *, keep, every, model, stepper, batches, resumed, enabled, alone=True
    ):
        self.directory, self.keep, self.every = Path(directory), keep, every
        self.model, self.stepper, self.batches = model, stepper, batches
        self.metrics, self.best_value = resumed.metrics, resumed.best
        # The one writer of the job waits for the others only under --timeout (they waited for
        # it); one of several writers may wait for another still writing.
        self.enabled, self.slow = enabled, enabled and alone
        # Batches of this epoch's start before and after its last finished optimizer step, or
        # None where the state is a saved one (rescue).
        self.finished = None

    def trained(self, steps):
        """An optimizer step finished: the state is that of `steps` batches into this start of
        the epoch."""
        self.finished = (self.finished[1] if self.finished else 0, steps)

    def rescue(self, records):
        """After a failure (a lost peer, most often): save the state of the last optimizer step
        this rank finished, the next round resumes there, and no sample is trained twice.

        No collective: the peers may be gone. The weights are those of that step on every rank
        that finished it (DDP), and a step finished on any rank had every rank's gradients, the
        lost one's too, so its samples are trained: `records` gets the step's ids, every rank's.
        Ranks that share a folder write it once (the first to claim the name); ranks that
        finished one step more save a newer checkpoint, which the next round's agreement picks
        (resuming.py). Bounded by RESCUE_S; a failure to write leaves the last save as the
        newest, and the log says which."""
        if self.finished is None or self.stepper.stepping:
            return  # nothing trained since the last save; or weights half changed
        where = self.batches.position(self.finished[1])
        final = self.directory / name(where["epoch"], where["samples"])
        claim = self.directory / f".rescue-{final.name}"
        try:
            if final.exists():
                return
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except OSError:
            return  # FileExistsError: another rank of this folder saves it
        try:
            with _within(RESCUE_S):
                now = self._state(where)
                save(now, self.directory, where["epoch"], where["samples"], self.keep)
            records.rescued(self.batches.ids(*self.finished))
        except Exception as err:  # noqa: BLE001 - whatever it was, the last save stands
            log.warning(
                "training failed: the last finished step was not saved (%s): the next round "
                "resumes from the last save",
                str(err).splitlines()[0] if str(err) else type(err).__name__,
            )
            return
        if where["samples"] == self.batches.size:  # in the epoch's end: validation, its save
            where_now = f"every sample of epoch {where['epoch'] + 1} trained, its end not saved"
        else:
            where_now = f"epoch {where['epoch']} done, {where['samples']} of"
            where_now += f" {self.batches.size} samples into the next"
        log.warning("training failed: saved its last finished step, %s: %s", final, where_now)

    def epoch_done(self, metrics, name=None, value=None, better=None):
        """The epoch's checkpoint, after best.pt if the epoch's `value` of `name` improved on
        the best so far: so the checkpoint records the best with this epoch counted, and a stop
        between the two saves leaves best.pt ahead (resuming.resume reads its value), never
        behind."""
        self.metrics = metrics
        if value is not None:
            self.validated(name, value, better)
        self._save(self.batches.position())
        self.finished = None

    def midway(self, steps):
        if self.every and steps % self.every == 0:
            self._save(self.batches.position(steps))

    def stopped(self, steps):
        where = self.batches.position(steps)
        path = self._save(where)
        if path:
            # Counted as the checkpoint's name counts: epochs done, samples into the next.
            log.info(
                "stop requested: saved %s: epoch %d done, %d of %d samples into the next",
                path,
                where["epoch"],
                where["samples"],
                self.batches.size,
            )

    def validated(self, name, value, better, steps=None):
        """Keep the state as best.pt if `value` of metric `name` is better than the best so far
        (`better(new, old)`; a tie keeps the earlier one). Into an epoch, call it before
        midway(steps), so that a checkpoint of the same step records this value."""
        if self.best_value is not None and not better(value, self.best_value):
            return
        self.best_value = value
        resting()
        with fail_together(slow=self.slow):  # a failed write stops every rank (status 2)
            if self.enabled:
                now = self._state(self.batches.position(steps))
                path = write(now, self.directory / BEST)
                log.info("best %s so far (%.4f): saved %s", name, value, path)

    def _state(self, where):
        now = state(self.model, self.stepper.optimizer, where, self.metrics, self.best_value)
        return {**now, **self.stepper.state_dict()}

    def _save(self, where):
        resting()  # every rank waits for the save, under --checkpoint-timeout, not HEALTH_TIMEOUT
        path = None
        with fail_together(slow=self.slow):
            if self.enabled:
                now = self._state(where)
                path = save(now, self.directory, where["epoch"], where["samples"], self.keep)
        return path


@contextmanager
def _within(seconds):
    """Raise TimeoutError in this (the main) thread if the block takes over `seconds`: a write to
    a stalled disk returns to Python between chunks (torch.save writes through the file)."""

    def expired(*_):
        raise TimeoutError(f"not written within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
