import pytest
import torch

from {{ cookiecutter.package }}.data import DataError, build_dataset, make_loader, synthetic


def _indices(sampler):
    return list(iter(sampler))


def test_shards_are_disjoint_and_cover_the_dataset():
    dataset = synthetic(60)
    shards = [_indices(make_loader(dataset, 8, rank, 3, seed=0)[1]) for rank in range(3)]
    assert all(len(s) == 20 for s in shards)
    flat = [i for s in shards for i in s]
    assert len(set(flat)) == 60
    assert sorted(flat) == list(range(60))


def test_sampler_reshuffles_every_epoch_and_repeats_with_the_seed():
    dataset = synthetic(64)
    _, sampler = make_loader(dataset, 8, rank=0, world_size=2, seed=0)
    sampler.set_epoch(0)
    first = _indices(sampler)
    sampler.set_epoch(1)
    second = _indices(sampler)
    sampler.set_epoch(0)
    assert first != second
    assert _indices(sampler) == first


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
