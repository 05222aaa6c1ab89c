"""Train the task with DistributedDataParallel: task.py, or the file TASK names.

Runs as a plain script (one process) or under torchrun (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment):

    python train_dist.py --epochs 2
    torchrun --standalone --nproc-per-node 2 train_dist.py --epochs 2 --task examples/charlm.py

Every rank trains its share of each epoch's samples, every sample once whatever the stops and
world sizes; each epoch ends with a validation pass over every validation sample once. Rank 0
logs; a checkpoint is written after every epoch (and best.pt when validation improves) in every
machine's checkpoint folder, and a start resumes from the newest one any machine holds. On
SIGTERM or SIGINT (docker stop, Ctrl-C) every rank stops at the same step and the checkpoint
where it stopped is saved, so the next start loses nothing.
"""

import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from {{ cookiecutter.package }} import checkpoint, distributed, logs, resuming, task_check, task_loader
from {{ cookiecutter.package }}.dealing import make_loaders, seed_all
from {{ cookiecutter.package }}.errors import USAGE_ERROR, UsageError
from {{ cookiecutter.package }}.flags import ROOT, parse_args, task_name
from {{ cookiecutter.package }}.folders import readable_dir, writable_dir
from {{ cookiecutter.package }}.health import resting
from {{ cookiecutter.package }}.logs import log_gpu_memory, progress, setup_logging
from {{ cookiecutter.package }}.metrics import MetricsLog, Sums, describe, epoch_metrics
from {{ cookiecutter.package }}.sample_log import SampleLog
from {{ cookiecutter.package }}.steps import Stepper
from {{ cookiecutter.package }}.validation import Validator

log = logging.getLogger("train")
NO_COMPILER = "--compile on CPUs needs a C++ compiler (g++, or CXX): add one or leave it out"


def train(args, task, stop):
    """Train; return 0 when done, or the exit status of a stop that was asked for."""
    # init: one process group across the job's ranks, or none under plain `python`
    resting()  # a re-formed round starts here: its rendezvous and load have their own bounds
    ranks = distributed.join(args)
    master_process = ranks.rank == 0
    loader, batches, val = load_data(args, task, ranks)
    model, net, stepper, resumed, folder = load_model(args, task, ranks, batches.size)

    # loop: an epoch at a time, validated and saved; a stop on any rank ends all at one step
    saver = checkpoint.Saver(
        args.checkpoint_dir,
        keep=args.keep,
        every=args.save_every_steps * args.accum_steps,
        model=model,
        stepper=stepper,
        batches=batches,
        resumed=resumed,
        enabled=folder.writes,  # one rank per distinct checkpoint folder (resuming.py)
        alone=folder.folders == 1,
    )
    validator = Validator(model, val, task, stepper, every=args.val_every_steps * args.accum_steps)
    best, metrics = f"val_{task.monitor}", resumed.metrics
    first_batch = task_check.FirstBatch(model, task, stepper, validates=val is not None)
    records = SampleLog(args.log_dir, ranks.rank, args.record_samples, round_token=folder.round)
    with stop, MetricsLog(args.log_dir, master_process) as metrics_log, rescuing(saver, records):
        for epoch in range(resumed.epoch, args.epochs):
            batches.set_epoch(epoch, resumed.samples if epoch == resumed.epoch else 0)
            records.start(epoch, batches.size)
            started, sums, steps = time.perf_counter(), Sums(ranks.device), 0
            shown = progress(loader, batches, epoch, args.epochs, every=args.progress_every)
            shown = first_batch.wrap(shown)  # the task's first step, checked (task_check.py)
            for steps, ids in stepper.train(net, shown, batches, task, stop=stop, sums=sums):
                saver.trained(steps)  # first: the weights are this step's now (Saver.rescue)
                records.add(ids)
                if validator.due(steps):
                    values, trained = validator.run(), batches.trained(steps)
                    metrics_log.midway(trained / batches.size, args.epochs, values, trained)
                    saver.validated(best, values[best], task.better, steps)
                saver.midway(steps)
            if stop.stopped:
                saver.stopped(steps)
                return stop.exit_status()
            seconds = time.perf_counter() - started
            metrics = epoch_metrics(task.summarize, sums, seconds, ranks.world_size)
            values = validator.run()
            metrics.update(values)
            saver.epoch_done(metrics, best, values.get(best), task.better)
            metrics_log.record(epoch + 1, args.epochs, metrics, (epoch + 1) * batches.size)

    # finish: every rank ended with the same weights
    if metrics is None:
        raise RuntimeError("no epoch ran and no checkpoint holds metrics")
    distributed.sync_buffers(model)
    distributed.check_in_step(model)
    log.info("final %s", describe(metrics))
    log_gpu_memory(ranks.device)
    return 0


def load_data(args, task, ranks):
    """(loader, batches, val loader or None) of the task's datasets; a problem a restart cannot
    fix (a folder, the task's own data) ends every rank with status 2."""
    seed_all(args.seed)
    with distributed.fail_together():
        setup_logging(ranks.rank, args.log_dir)
        try:
            writable_dir(args.checkpoint_dir)  # any rank may write there (resuming.py)
        except UsageError as err:  # said once a machine, by its first process
            raise UsageError(str(err) if os.environ.get("LOCAL_RANK", "0") == "0" else "") from None
        readable_dir(args.data_dir)
    with distributed.fail_together(once=True), task_check.task_code("datasets()"):
        train_set, val_set = task_check.map_style(task.datasets(args))
    shape = dict(workers=args.workers, collate=task.collate, pin=ranks.device.type == "cuda")
    loader, batches, val = make_loaders(
        train_set, val_set, ranks, batch_size=args.batch_size, seed=args.seed, **shape
    )
    sizes = len(train_set), len(val_set) if val else 0
    where = f"world size {ranks.world_size}, backend {args.backend}, task {task.name}"
    log.info("%s: %d training samples, %d validation", where, *sizes)
    return loader, batches, val


def load_model(args, task, ranks, train_size):
    """(model, the module trained: DDP's and --compile's wrapping, its Stepper, Resumed, and
    which folder this rank writes): the task's model and optimizer, from the newest checkpoint
    any node holds (resuming.py)."""
    seed_all(args.seed)
    with distributed.fail_together(once=True):
        with task_check.task_code("model()"):
            model = task.model(args).to(ranks.device)
        with task_check.task_code("optimizer()"):
            optimizer = task.optimizer(model, args)
    cuda, total = ranks.device.type == "cuda", args.epochs * train_size
    ddp_net = DDP(model, device_ids=[ranks.device] if cuda else None) if ranks.ddp else None
    stepper = Stepper.from_args(args, optimizer, device=ranks.device, ddp=ddp_net, total=total)
    resumed, folder = resuming.resume(
        args.checkpoint_dir,
        model,
        stepper,
        rank=ranks.rank,
        keep=args.keep,
        seed=args.seed,
        size=train_size,
        samples_per_step=args.batch_size * ranks.world_size,
        better=task.better,
    )
    net = ddp_net or model
    if args.compile:
        if not cuda and not shutil.which(os.environ.get("CXX", "g++")):
            raise UsageError(NO_COMPILER if ranks.rank == 0 else "")
        net = torch.compile(net)
    return model, net, stepper, resumed, folder


@contextmanager
def rescuing(saver, records):
    """The sample records of this start, closed at its end; a failure in the loop (a lost peer,
    most often) saves the last optimizer step this rank finished before it ends the process,
    and the next round goes on from there (Saver.rescue)."""
    with records:
        try:
            yield
        except UsageError:
            raise
        except Exception:
            saver.rescue(records)
            raise


def main(argv=None):
    try:
        with distributed.stop_at_once():
            task = task_loader.load(task_name(argv), ROOT)
            args = parse_args(argv, task)
            return train(args, task, distributed.GracefulStop())
    except distributed.Stopped as stopped:
        return stopped.status
    except UsageError as err:
        if str(err):  # empty on the ranks that stopped because another found the problem
            logs.report(f"{getattr(err, 'details', '')}\nERROR: {err}".strip())
        return USAGE_ERROR
    except Exception as err:  # noqa: BLE001 - the node prints it once (launcher/node.py)
        logs.record_failure(err)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
