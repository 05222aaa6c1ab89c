import torch

from {{ cookiecutter.package }} import checkpoint


def _state(epoch):
    return {"weights": torch.full((3,), float(epoch)), "epoch": epoch, "loss": 1.0 / epoch}


def test_round_trip(tmp_path):
    path = checkpoint.save(_state(1), tmp_path, 1)
    state, loaded_from = checkpoint.load_latest(tmp_path)
    assert loaded_from == path
    assert state["epoch"] == 1
    assert torch.equal(state["weights"], torch.ones(3))


def test_newest_wins_and_only_the_last_k_are_kept(tmp_path):
    for epoch in range(1, 6):
        checkpoint.save(_state(epoch), tmp_path, epoch, keep=2)
    names = [p.name for p in checkpoint.checkpoints(tmp_path)]
    assert names == ["ckpt-epoch0004.pt", "ckpt-epoch0005.pt"]
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 5
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path):
    checkpoint.save(_state(1), tmp_path, 1)
    bad = checkpoint.save(_state(2), tmp_path, 2)
    bad.write_bytes(bad.read_bytes()[:20])
    state, path = checkpoint.load_latest(tmp_path)
    assert state["epoch"] == 1 and path.name == "ckpt-epoch0001.pt"
    assert (tmp_path / "ckpt-epoch0002.pt.corrupt").exists()


def test_half_written_temporary_file_is_ignored(tmp_path):
    checkpoint.save(_state(1), tmp_path, 1)
    (tmp_path / ".ckpt-epoch0002.pt.tmp").write_bytes(b"partial")
    assert checkpoint.load_latest(tmp_path)[0]["epoch"] == 1


def test_no_checkpoint(tmp_path):
    assert checkpoint.load_latest(tmp_path / "missing") == (None, None)
