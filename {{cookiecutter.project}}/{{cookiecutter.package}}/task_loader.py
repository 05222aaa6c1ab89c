"""Loading the task that TASK names (task.py beside train_dist.py unless .env says otherwise),
with its optional parts filled in; the contract is at the top of task.py."""

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

from torch.utils.data import default_collate

from {{ cookiecutter.package }}.distributed import env_rank
from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.task_helpers import means

DEFAULT = "task.py"
REQUIRED = ("datasets", "model", "optimizer", "step")


def load(spec, root):
    """The task module `spec` names (a file relative to `root`, or a module), with defaults."""
    module = _import(spec, Path(root))
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        contract = f"the contract is at the top of {DEFAULT}"
        raise UsageError(f"TASK {spec} defines no {', '.join(missing)}: {contract}")
    written, mode = getattr(module, "MONITOR", "loss"), getattr(module, "MODE", "min")
    if mode not in ("min", "max"):
        raise UsageError(f"TASK {spec}: MODE must be 'min' or 'max', got {mode!r}")
    if not isinstance(written, str) or not written.removeprefix("val_"):
        raise UsageError(f"TASK {spec}: MONITOR must name a validation metric, got {written!r}")
    return SimpleNamespace(
        name=spec,
        datasets=module.datasets,
        model=module.model,
        optimizer=module.optimizer,
        step=module.step,
        add_arguments=getattr(module, "add_arguments", lambda parser: None),
        collate=getattr(module, "collate", default_collate),
        summarize=getattr(module, "summarize", means),
        # The name summarize() gives it; MONITOR may say it as logged (val_accuracy) too.
        monitor=written.removeprefix("val_"),
        monitor_written=written,
        better=(lambda new, old: new < old) if mode == "min" else (lambda new, old: new > old),
    )


def _import(spec, root):
    if not spec.endswith(".py"):
        return _guarded(spec, importlib.import_module, spec)
    path = (root / spec).resolve()
    if not path.is_file():
        raise UsageError(f"TASK {spec}: no such file (a path relative to {root})")
    try:
        # Inside the project: imported by its module name, so that DataLoader workers started
        # with spawn can unpickle the task's classes.
        name = ".".join(path.relative_to(root.resolve()).with_suffix("").parts)
    except ValueError:
        file_spec = importlib.util.spec_from_file_location("task", path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules["task"] = module
        _guarded(spec, file_spec.loader.exec_module, module)
        return module
    if str(root.resolve()) not in map(str, sys.path):
        sys.path.insert(0, str(root.resolve()))
    return _guarded(spec, importlib.import_module, name)


def _guarded(spec, load_it, what):
    """A task that does not import ends the job (status 2: a restart cannot fix it), with its
    traceback from rank 0 alone."""
    try:
        return load_it(what)
    except Exception as err:
        if env_rank() > 0:
            raise UsageError("") from None
        traceback.print_exc()
        raise UsageError(f"TASK {spec} does not import: {err}") from None
