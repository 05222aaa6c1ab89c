"""Which samples each rank trains: every sample of an epoch exactly once, across stops, restarts
and changes of world size.

An epoch is one permutation of the dataset, seeded by seed + epoch. Training walks it as a prefix:
each step takes the next batch_size x world_size positions, and rank r takes every
world_size-th of them from r on. So the samples consumed so far are one number whatever the world
size was, and a resumed epoch deals the rest of the permutation over the ranks it has now,
without loading the samples before it. The last step of an epoch may not fill every rank: a rank
short of samples gets padding, id PAD, which training masks out of the loss and the counts.
"""

import torch
from torch.utils.data import DataLoader, Dataset

PAD = -1


class WithIds(Dataset):
    """(image, label, id) for each index; PAD stands in for a sample (the first) and is masked."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[max(index, 0)]
        return image, label, index


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


def make_loader(dataset, batch_size, rank, world_size, seed, workers=0):
    """A loader of (images, labels, ids) and its batches; call batches.set_epoch each epoch."""
    batches = EpochBatches(len(dataset), batch_size, rank, world_size, seed)
    loader = DataLoader(
        WithIds(dataset),
        batch_sampler=batches,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    return loader, batches
