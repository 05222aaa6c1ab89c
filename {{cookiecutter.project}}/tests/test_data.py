from argparse import Namespace

import pytest
import torch
from torch.utils.data import default_collate

import task
from {{ cookiecutter.package }}.dealing import PAD, EpochBatches, make_loader, val_loader
from {{ cookiecutter.package }}.errors import UsageError
from {{ cookiecutter.package }}.folders import readable_dir
from task import synthetic


def _trained(world_size, batch_size=8, size=60, epoch=0, consumed=0):
    """Every rank's batches of one epoch from `consumed` on."""
    ranks = [EpochBatches(size, batch_size, r, world_size, seed=0) for r in range(world_size)]
    for batches in ranks:
        batches.set_epoch(epoch, consumed)
    return [list(batches) for batches in ranks]


def _ids(batches_by_rank):
    return [i for batches in batches_by_rank for batch in batches for i in batch if i != PAD]


def test_shards_are_disjoint_and_cover_the_dataset():
    by_rank = _trained(3, batch_size=8, size=60)
    assert len({len(batches) for batches in by_rank}) == 1  # every rank takes every step
    assert sorted(_ids(by_rank)) == list(range(60))


def test_the_last_step_pads_short_ranks_so_that_all_take_it():
    # 60 samples, 3 ranks x 8: 2 full steps (48), then 12 over 3 ranks: 4 each, no padding;
    # 64 samples, 3 x 8: the last step has 16 for 3 ranks, 6 each with 2 padded.
    assert [len(b) for b in _trained(3, size=60)[0]] == [8, 8, 4]
    last = [batches[-1] for batches in _trained(3, size=64)]
    assert [len(b) for b in last] == [6, 6, 6]
    assert sum(b.count(PAD) for b in last) == 2
    assert sorted(_ids(_trained(3, size=64))) == list(range(64))


def test_a_resumed_epoch_deals_the_rest_over_the_ranks_it_has_now():
    first = _trained(3, size=100)
    done = 2 * 8 * 3  # two steps of 3 ranks
    before = {i for batches in first for batch in batches[:2] for i in batch}
    after = _ids(_trained(2, size=100, consumed=done))
    assert len(before) == done and len(after) == 100 - done
    assert sorted(before | set(after)) == list(range(100)) and not before & set(after)


def test_the_order_changes_every_epoch_and_repeats_with_the_seed():
    assert _trained(2, epoch=0) != _trained(2, epoch=1)
    assert _trained(2, epoch=0) == _trained(2, epoch=0)


def test_the_loader_gives_the_real_samples_and_their_ids():
    # 10 samples, 3 ranks x 4: after 6, rank 1 gets the 8th of the order and a pad.
    dataset = synthetic(10)
    loader, batches = make_loader(dataset, 4, rank=1, world_size=3, seed=0)
    batches.set_epoch(0, consumed=6)
    ((images, labels), ids) = next(iter(loader))
    assert ids.tolist() == [batches.order()[7]]
    assert images.shape == (1, 3, 32, 32) and labels.shape == (1,)
    assert torch.equal(images[0], dataset[batches.order()[7]][0])
    assert batches.step_samples(0) == 4  # over every rank: 10 - 6


def test_a_rank_with_only_padding_gets_stand_ins_and_no_ids():
    loader, batches = make_loader(synthetic(10), 4, rank=2, world_size=3, seed=0)
    batches.set_epoch(0, consumed=8)  # 2 left for 3 ranks: rank 2 gets a pad
    ((images, _), ids) = next(iter(loader))
    assert ids.tolist() == [] and len(images) == 1
    assert batches.step_samples(0) == 2


def test_batches_may_be_any_structure_the_task_collates():
    pairs = [({"x": torch.tensor([i, i]), "n": i}) for i in range(6)]
    loader, batches = make_loader(pairs, 3, rank=0, world_size=2, seed=0)
    batch, ids = next(iter(loader))
    assert batch["x"].shape == (3, 2) and batch["n"].tolist() == ids.tolist()


def test_validation_deals_every_sample_once_without_padding():
    dataset = [(torch.tensor(float(i)), i) for i in range(11)]
    seen = []
    for rank in range(4):
        for (_, labels), ids in val_loader(dataset, 2, rank, world_size=4):
            assert labels.tolist() == ids.tolist()
            seen += ids.tolist()
    assert sorted(seen) == list(range(11))


def test_synthetic_is_deterministic_and_labelled():
    a, b = synthetic(32, seed=3), synthetic(32, seed=3)
    images, labels = default_collate([a[i] for i in range(32)])
    assert torch.equal(images, default_collate([b[i] for i in range(32)])[0])
    assert images.shape == (32, 3, 32, 32) and int(labels.max()) < 10
    other = synthetic(32, seed=4)
    assert not torch.equal(images, default_collate([other[i] for i in range(32)])[0])
    assert torch.equal(a[-1][0], a[31][0])
    with pytest.raises(IndexError):
        a[32]
    # The class's pattern is what a model learns: the mean image of a class is near it.
    many = synthetic(2000, seed=3)
    means = {}
    for image, label in (many[i] for i in range(2000)):
        means.setdefault(int(label), []).append(image)
    for label, images in means.items():
        mean = torch.stack(images).mean(0)
        assert torch.allclose(mean, 0.5 * many.patterns[label], atol=0.35), label


def _args(data_dir, samples=16):
    return Namespace(data_dir=str(data_dir), samples=samples, seed=0)


def _images(folder, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    for label in classes:
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 20), color=(i * 40, 10, 200)).save(folder / label / f"{i}.png")


def test_without_data_train_the_default_task_is_synthetic(tmp_path):
    # Images anywhere else under data/ do not switch it: only the data/train layout does.
    _images(tmp_path / "stray")
    train, val = task.datasets(_args(tmp_path))
    assert (len(train), len(val)) == (16, 2)
    assert not torch.equal(train[0][0], val[0][0])  # other samples, the same classes
    assert task.model(_args(tmp_path)).classifier.out_features == 10


def test_data_train_and_val_are_image_folders(tmp_path):
    _images(tmp_path / "train")
    _images(tmp_path / "val", per_class=1)
    train, val = task.datasets(_args(tmp_path))
    assert (len(train), len(val)) == (6, 2)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert task.model(_args(tmp_path)).classifier.out_features == 2


def test_without_data_val_a_tenth_of_train_is_held_out(tmp_path):
    _images(tmp_path / "train", per_class=10)
    train, val = task.datasets(_args(tmp_path))
    assert (len(train), len(val)) == (18, 2)
    assert not set(train.indices) & set(val.indices)
    again = task.datasets(_args(tmp_path))[1]
    assert again.indices == val.indices  # the same on every rank and at every start


def test_val_classes_must_match_train(tmp_path):
    _images(tmp_path / "train")
    _images(tmp_path / "val", classes=("cat", "cow"))
    with pytest.raises(UsageError, match="has classes"):
        task.datasets(_args(tmp_path))


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        readable_dir(tmp_path / "nope")


def test_unreadable_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(UsageError, match="is not readable"):
        readable_dir(tmp_path)


def test_position_is_where_the_epoch_stands_as_checkpoints_keep_it():
    batches = EpochBatches(100, batch_size=8, rank=1, world_size=3, seed=5)  # 24 samples a step
    batches.set_epoch(2, consumed=48)  # resumed 2 steps into epoch 3
    dealt = {"world_size": 3, "batch_size": 8, "seed": 5, "size": 100}
    assert batches.position(0) == {"epoch": 2, "samples": 48, **dealt}
    assert batches.position(1) == {"epoch": 2, "samples": 72, **dealt}
    assert len(batches) == 3  # 52 left: 24, 24 and 4
    assert batches.position(3) == {"epoch": 2, "samples": 100, **dealt}  # never past the end
    assert batches.position() == {"epoch": 3, "samples": 0, **dealt}  # the epoch done
    # The same position resumed at another world size deals the rest: no sample before it.
    other = EpochBatches(100, batch_size=8, rank=0, world_size=2, seed=5)
    other.set_epoch(2, consumed=batches.position(1)["samples"])
    order = batches.order()
    dealt_after = {i for r in range(2) for step in _rank(other, r) for i in step}
    assert dealt_after == set(order[72:])


def _rank(batches, rank):
    copy = EpochBatches(batches.size, batches.batch_size, rank, batches.world_size, batches.seed)
    copy.set_epoch(batches.epoch, batches.consumed)
    return list(copy)
