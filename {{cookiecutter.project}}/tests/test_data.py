import pytest
import torch

from {{ cookiecutter.package }}.data import DataError, build_dataset, synthetic
from {{ cookiecutter.package }}.sampling import PAD, EpochBatches, make_loader


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


def test_the_loader_gives_ids_and_pads_with_the_first_sample():
    loader, batches = make_loader(synthetic(10), 4, rank=1, world_size=3, seed=0)
    batches.set_epoch(0, consumed=6)
    ((images, labels, ids),) = list(loader)
    assert ids.tolist() == [batches.order()[7], PAD]
    assert images.shape == (2, 3, 32, 32) and labels.shape == (2,)


def test_synthetic_is_deterministic_and_labelled():
    a, b = synthetic(32, seed=3), synthetic(32, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0])
    assert a.tensors[0].shape == (32, 3, 32, 32)
    assert int(a.tensors[1].max()) < 10


def test_empty_folder_falls_back_to_synthetic(tmp_path):
    dataset, classes, description = build_dataset(tmp_path, samples=16)
    assert len(dataset) == 16 and classes == 10
    assert "synthetic" in description


def test_image_folder_is_used_when_present(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 20), color=(i * 40, 10, 200)).save(tmp_path / label / f"{i}.png")
    dataset, classes, description = build_dataset(tmp_path, samples=16)
    assert classes == 2 and len(dataset) == 6
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and label == 0
    assert "ImageFolder" in description


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(tmp_path / "nope", samples=16)


def test_unreadable_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("os.access", lambda path, mode: False)
    with pytest.raises(DataError, match="is not readable"):
        build_dataset(tmp_path, samples=16)
