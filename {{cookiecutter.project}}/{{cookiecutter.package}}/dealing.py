"""Which samples each rank trains: every sample of an epoch exactly once, across stops, restarts
and changes of world size.

An epoch is one permutation of the dataset, seeded by seed + epoch. Training walks it as a prefix:
each step takes the next batch_size x world_size positions, and rank r takes every
world_size-th of them from r on. So the samples consumed so far are one number whatever the world
size was, and a resumed epoch deals the rest of the permutation over the ranks it has now,
without loading the samples before it. The last step of an epoch may not fill every rank: a rank
short of samples gets padding, id PAD, which is dropped before the task's collate; a rank left
with none trains stand-ins (copies of the first sample) whose loss the loop weighs by 0 (DDP
needs every rank in every step).

Validation deals a dataset's indices over the ranks once, without padding: every sample is
evaluated exactly once.

Randomness in the data (augmentation) and in the model (dropout) is seeded from what is being
trained: each batch from the run's seed, the epoch and its sample ids, where it is loaded (this
process or a DataLoader worker), so that a sample is augmented anew each epoch; each training step
from the seed, the rank and the position. So a resumed job draws what the uninterrupted one drew,
with no random state in checkpoints.
"""

import os
import random

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

try:
    import numpy
except ImportError:  # numpy is optional for torch
    numpy = None

PAD = -1


def seed_all(*parts):
    """Seed Python's, numpy's and torch's generators (CUDA's on the current device too) from
    `parts` (whole numbers). Python's hash of a tuple of ints is the same in every process."""
    seed = hash(parts) & (2**63 - 1)
    random.seed(seed)
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    # Not torch.manual_seed: it also seeds every CUDA device, 80 us a call here.
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)


class Draw(list):
    """A training batch's indices, and the epoch they are drawn for: what seeds its loading.
    Sent as it is to a DataLoader worker (a list that pickles with its epoch)."""

    def __init__(self, indices, epoch):
        super().__init__(indices)
        self.epoch = epoch


class WithIds(Dataset):
    """(id, sample) for each index: the ids that exactly-once needs, outside the task's dataset.
    PAD stands in for a sample (the first one). A batch is loaded with the generators seeded
    from the run's seed, its epoch (a Draw's; 0 for validation) and its ids."""

    def __init__(self, dataset, seed=0):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[max(index, 0)]

    def __getitems__(self, indices):
        seed_all(self.seed, getattr(indices, "epoch", 0), *indices)
        return [self[index] for index in indices]


class Collate:
    """(batch, ids): the task's collate of the real samples, and their ids (none for a rank
    that got only padding: its batch is then the stand-ins)."""

    def __init__(self, collate=default_collate):
        self.collate = collate

    def __call__(self, items):
        real = [(i, sample) for i, sample in items if i != PAD]
        batch = self.collate([sample for _, sample in real or items])
        return batch, torch.tensor([i for i, _ in real], dtype=torch.long)


class EpochBatches:
    """This rank's batches of dataset indices for the rest of an epoch (a batch sampler)."""

    def __init__(self, size, batch_size, rank, world_size, seed):
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch, consumed=0):
        """Start epoch `epoch` after its first `consumed` samples."""
        self.epoch, self.consumed = epoch, consumed

    def order(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    @property
    def per_step(self):
        return self.batch_size * self.world_size

    def __len__(self):
        return -(-(self.size - self.consumed) // self.per_step)

    def step_samples(self, steps):
        """Real samples over every rank in the step after `steps` steps of this start: the
        per_step of a full step, fewer in the last one."""
        return min(self.per_step, self.size - self.consumed - steps * self.per_step)

    def group_samples(self, steps, group):
        """Real samples over every rank in the group of `group` steps (an optimizer step with
        accumulation) that holds the step after `steps` steps of this start."""
        first = steps - steps % group
        return sum(self.step_samples(s) for s in range(first, min(first + group, len(self))))

    def weight(self, steps, samples, group):
        """The loss weight of the batch after `steps` steps of this start, holding `samples`
        real samples, in an optimizer step of `group` batches. DDP averages the ranks'
        gradients: weighing each rank's mean by its share of the step's samples makes a short
        step count every sample once, as one process would (and a rank that got only padding
        count for nothing)."""
        return samples * self.world_size / self.group_samples(steps, group)

    def seed_step(self, steps):
        """Seed the generators for the batch after `steps` steps of this start (dropout): from
        the seed, this rank and the samples trained, so a resume draws what a run without a
        stop drew."""
        seed_all(self.seed, self.rank, self.trained(steps))

    def trained(self, steps):
        """Samples of the job trained after `steps` steps of this start (all earlier epochs'
        included)."""
        return self.epoch * self.size + min(self.size, self.consumed + steps * self.per_step)

    def __iter__(self):
        rest = self.order()[self.consumed :]
        for start in range(0, len(rest), self.per_step):
            step = rest[start : start + self.per_step]
            mine = step[self.rank :: self.world_size]
            # Every rank gets a batch of the same size: DDP needs every rank in every step.
            width = -(-len(step) // self.world_size)
            yield Draw(mine + [PAD] * (width - len(mine)), self.epoch)

    def ids(self, first, last):
        """Every rank's sample ids in this start's steps `first` to `last` (excluded)."""
        return self.order()[self.consumed :][first * self.per_step : last * self.per_step]

    def position(self, steps=None):
        """Where training stands after `steps` more steps of this epoch (None: at its end), as
        checkpoints keep it: epochs done, samples into the next, and what dealt them."""
        if steps is None:
            epoch, samples = self.epoch + 1, 0
        else:
            epoch, samples = self.epoch, min(self.size, self.consumed + steps * self.per_step)
        return {
            "epoch": epoch,
            "samples": samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "size": self.size,
        }


def make_loader(
    dataset, batch_size, rank, world_size, seed, workers=0, collate=default_collate, pin=False
):
    """A loader of (batch, ids) and its batches; call batches.set_epoch each epoch. `pin`:
    batches in page-locked memory, which a GPU copies from while the host goes on."""
    batches = EpochBatches(len(dataset), batch_size, rank, world_size, seed)
    loader = DataLoader(
        WithIds(dataset, seed),
        batch_sampler=batches,
        collate_fn=Collate(collate),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )
    return loader, batches


def make_loaders(train, val, ranks, *, batch_size, seed, **shape):
    """(loader, batches, val_loader or None) for a task's datasets on this rank
    (distributed.Ranks); `shape`: make_loader's workers, collate and pin."""
    rank, world_size = ranks.rank, ranks.world_size
    loader, batches = make_loader(train, batch_size, rank, world_size, seed, **shape)
    if val is None or not len(val):
        return loader, batches, None
    return loader, batches, val_loader(val, batch_size, rank, world_size, **shape)


def val_loader(
    dataset, batch_size, rank, world_size, workers=0, collate=default_collate, pin=False
):
    """This rank's share of a validation set: every world_size-th sample from `rank` on, so
    that the ranks evaluate each sample exactly once (some ranks one fewer; none padded)."""
    return DataLoader(
        WithIds(dataset),
        sampler=range(rank, len(dataset), world_size),
        batch_size=batch_size,
        collate_fn=Collate(collate),
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )


def default_workers():
    """DataLoader workers per process from the CPUs each has (the launcher sets
    OMP_NUM_THREADS from the node's CPU limit): none on 1 CPU, half of them up to 4."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    return min(4, threads // 2)
