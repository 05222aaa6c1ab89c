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
"""

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

PAD = -1


class WithIds(Dataset):
    """(id, sample) for each index: the ids that exactly-once needs, outside the task's dataset.
    PAD stands in for a sample (the first one)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[max(index, 0)]


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

    def __iter__(self):
        rest = self.order()[self.consumed :]
        for start in range(0, len(rest), self.per_step):
            step = rest[start : start + self.per_step]
            mine = step[self.rank :: self.world_size]
            # Every rank gets a batch of the same size: DDP needs every rank in every step.
            width = -(-len(step) // self.world_size)
            yield mine + [PAD] * (width - len(mine))

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
        }


def make_loader(dataset, batch_size, rank, world_size, seed, workers=0, collate=default_collate):
    """A loader of (batch, ids) and its batches; call batches.set_epoch each epoch."""
    batches = EpochBatches(len(dataset), batch_size, rank, world_size, seed)
    loader = DataLoader(
        WithIds(dataset),
        batch_sampler=batches,
        collate_fn=Collate(collate),
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return loader, batches


def val_loader(dataset, batch_size, rank, world_size, workers=0, collate=default_collate):
    """This rank's share of a validation set: every world_size-th sample from `rank` on, so
    that the ranks evaluate each sample exactly once (some ranks one fewer; none padded)."""
    return DataLoader(
        WithIds(dataset),
        sampler=range(rank, len(dataset), world_size),
        batch_size=batch_size,
        collate_fn=Collate(collate),
        num_workers=workers,
        persistent_workers=workers > 0,
    )
