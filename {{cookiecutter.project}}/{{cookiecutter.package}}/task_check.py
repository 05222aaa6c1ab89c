"""A fork's mistakes in its task, found before they cost a restart.

Everything the loop runs of the task's own code before its first optimizer step (datasets(),
model(), optimizer(), the first batch's loading, collate and step, summarize()) stops every rank
with status 2 when it raises or breaks the contract at the top of task.py: a restart would fail
the same way. The rank that found it prints the task's part of the traceback and one line that
says what to fix. The first batch is stepped once on the model itself, not DDP's wrapper, so that
a rank whose step fails leaves no peer waiting in a collective; its buffers (BatchNorm's
statistics) are put back, and no gradient is kept.
"""

import sysconfig
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from {{ cookiecutter.package }}.distributed import fail_together
from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.steps import to_device

# Frames of the machinery and of installed libraries are not the task's own: a traceback starts
# at the task's first frame.
_MACHINERY = str(Path(__file__).resolve().parent)
_TRAIN_SCRIPT = str(Path(__file__).resolve().parents[1] / "train_dist.py")
_LIBRARIES = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})
# Exception texts whose cause is usually one thing in the task: what to do about it.
HINTS = (
    (
        ("same dtype", "expected scalar type", "found dtype"),
        "the batch and the model have different dtypes (float64 data into a float32 model?): "
        "make datasets() return float32 tensors (.float())",
    ),
    (
        ("shapes cannot be multiplied", "size mismatch", "must match the size"),
        "the batch's shape does not fit the model: make datasets() and model() agree",
    ),
)
# Not a mistake in the task: the machine took something away (a worker killed for memory).
NOT_THE_TASK = ("killed by signal", "out of memory", "Connection", "NCCL")


class TaskError(UsageError):
    """A mistake in the task: one line of what to fix; `details`, the task's traceback lines."""

    def __init__(self, message, details=""):
        super().__init__(message)
        self.details = details


def _ours(filename):
    return filename.startswith(_MACHINERY) or filename == _TRAIN_SCRIPT


def _task(frame):
    return not _ours(frame.filename) and not _library(frame.filename)


def _library(filename):
    return filename.startswith(_LIBRARIES) or filename.startswith("<")


def task_traceback(err):
    """The traceback of `err` from the task's first frame on (with the library frames it
    called); the exception line alone where no frame is the task's (a DataLoader worker's
    error carries the worker's traceback in its text)."""
    frames = traceback.extract_tb(err.__traceback__)
    first = next(
        (i for i, f in enumerate(frames) if _task(f)),
        len(frames),
    )
    # The task's own frames, and the one that raised (a library's, often): not the library
    # frames between them.
    shown = [f for i, f in enumerate(frames[first:], first) if i == len(frames) - 1 or _task(f)]
    lines = traceback.format_list(shown) if first < len(frames) else []
    head = ["Traceback (the task's code, most recent call last):\n"] if lines else []
    return "".join(head + lines + traceback.format_exception_only(type(err), err)).rstrip()


def what_to_fix(err, what):
    text = str(err)
    for needles, hint in HINTS:
        if any(needle in text for needle in needles):
            return hint
    return f"fix the task's {what} (the traceback above), then start again"


@contextmanager
def task_code(what):
    """Run the task's `what` (datasets(), model(), ...): an exception it raises is a TaskError."""
    try:
        yield
    except UsageError:
        raise
    except Exception as err:
        # The machine taking something away: a restart may well succeed. (A stop is not an
        # Exception: distributed.Stopped.)
        if any(s in str(err) for s in NOT_THE_TASK):
            raise
        first = (str(err).strip().splitlines() or [""])[-1 if "Traceback" in str(err) else 0]
        message = f"the task's {what} raised {type(err).__name__}: {first.strip()}"
        raise TaskError(f"{message}: {what_to_fix(err, what)}", task_traceback(err)) from None


def map_style(pair):
    """datasets()'s (train, val), once each is known to be map-style (len() and [index])."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TaskError(f"datasets() returned {_kind(pair)}: return (train, val); val may be None")
    for split, dataset in zip(("train", "val"), pair, strict=True):
        if dataset is None and split == "val":
            continue
        iterable = isinstance(dataset, IterableDataset)
        if iterable or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TaskError(
                f"datasets() returned {_kind(dataset)}{' (an IterableDataset)' if iterable else ''}"
                f" as the {split} set: the loop deals indices"
                " so that every sample is trained once whatever the stops, so it needs a "
                "map-style dataset (len() and [index]): a Dataset with __len__ and __getitem__,"
                " a TensorDataset, or a list"
            )
    return pair


class FirstBatch:
    """The contract check of a start's first training batch: wrap(items) the first time, on
    every rank (a collective), then items as they are."""

    def __init__(self, model, task, stepper, validates):
        self.model, self.task, self.stepper, self.validates = model, task, stepper, validates
        self.done = False

    def wrap(self, items):
        if self.done:
            return items
        self.done = True
        return self._checked(items)

    def _checked(self, items):
        items = iter(items)
        with fail_together(once=True), task_code("dataset, collate or step (first batch)"):
            first = next(items, None)
            if first is not None:
                self.check(*first)
        if first is not None:
            yield first
        yield from items

    def check(self, batch, ids):
        """What step() returns for `batch` (collate's output, `ids` its samples), checked."""
        saved = [buffer.detach().clone() for buffer in self.model.buffers()]
        try:
            with self.stepper.autocast():
                out = self.task.step(self.model, to_device(batch, self.stepper.device))
            try:
                loss, sums = contract(out)
            except TaskError as err:
                err.details = err.details or where(self.task.step)
                raise
            if self.validates:
                with task_code("summarize()"):
                    samples = len(ids)
                    totals = {"loss": float(loss.detach()) * samples, "samples": samples}
                    names = self.task.summarize({**totals, **floats(sums)})
                check_monitor(self.task, names)
        finally:
            with torch.no_grad():
                for buffer, value in zip(self.model.buffers(), saved, strict=True):
                    buffer.copy_(value)


def contract(out):
    """(loss, sums) from what step() returned, or a TaskError that says what is wrong."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TaskError(
            f"step(model, batch) returned {_kind(out)}: return (loss, sums), sums a dict of "
            "tensors summed over the batch ({} for none)"
        )
    loss, sums = out
    if not isinstance(loss, torch.Tensor):
        raise TaskError(
            f"step() returned the loss as {_kind(loss)}, not a tensor: return the tensor itself"
            " (no .item(), float() or .tolist()), so that the loop can backpropagate it"
        )
    if loss.dim() != 0:
        raise TaskError(
            f"step() returned a loss of shape {list(loss.shape)}: return the batch's mean, a"
            " scalar (loss.mean(), or the loss function's default reduction='mean')"
        )
    if not loss.is_floating_point():
        raise TaskError(f"step() returned a loss of dtype {loss.dtype}: it must be a float tensor")
    if not loss.requires_grad:
        raise TaskError(
            "step() returned a loss that does not require grad: compute it from the model's "
            "output, not under torch.no_grad() or from .detach()ed or .item() values"
        )
    if not isinstance(sums, dict):
        none = "{} for none"
        raise TaskError(f"step()'s sums are {_kind(sums)}: return a dict of sums ({none})")
    for name, value in sums.items():
        if name in ("loss", "samples"):
            raise TaskError(f"step()'s sums name {name!r}: the loop adds it; call yours otherwise")
        tensor = isinstance(value, torch.Tensor)
        if (tensor and value.numel() != 1) or not (tensor or _number(value)):
            shape = f"of shape {list(value.shape)}" if tensor else _kind(value)
            raise TaskError(
                f"step()'s sum {name!r} is {shape}: each sum is one number over the batch "
                f"(e.g. correct.sum()), which the loop adds up over steps and ranks"
            )
    return loss, sums


def check_monitor(task, names):
    """The task's MONITOR among the validation values it reports (summarize()'s names)."""
    if not isinstance(names, dict):
        raise TaskError(f"summarize() returned {_kind(names)}: return a dict of name: value")
    if task.monitor not in names:
        prefix = "val_" if task.monitor_written.startswith("val_") else ""
        listed = sorted(f"{prefix}{name}" for name in names)
        raise TaskError(
            f"the task's MONITOR {task.monitor_written!r} is not one of {listed}: set MONITOR "
            "to one of them (with or without val_), the metric that picks best.pt"
        )


def where(function):
    """A function's place in the task, as a traceback line says it."""
    code = getattr(function, "__code__", None)
    if code is None:
        return ""
    return f"in the task: {code.co_name}() at {code.co_filename}:{code.co_firstlineno}"


def floats(sums):
    return {name: float(torch.as_tensor(value).detach()) for name, value in sums.items()}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value):
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
