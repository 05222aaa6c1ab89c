"""The ranks of a job agree on the newest checkpoint any folder holds, whatever disks they share;
what a peer sends is decoded as data, never run."""

import json
import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from nodes import free_port

from {{ cookiecutter.package }} import checkpoint, distributed, resuming
from {{ cookiecutter.package }}.checkpoint import CheckpointError
from {{ cookiecutter.package }}.errors import UsageError


def _state(epoch, value=0.0):
    return {"model": {"w": torch.full((3,), value)}, "epoch": epoch, "samples": 0}


def _rank(rank, port, scenario, tmp_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
    os.environ.update(WORLD_SIZE="2", LOCAL_RANK="0")
    distributed.init("gloo", 30, 30)
    result = {}
    try:
        if scenario == "folders":
            shared = resuming.find_folders(tmp_path / "shared")
            own = tmp_path / f"own{rank}"
            folder = resuming.find_folders(own)
            state, path, whose = resuming.agree(own, folder, keep=3, rank=rank)
            result = {
                "shared": list(shared),
                "own": list(folder),
                "epoch": state["epoch"],
                "path": str(path),
                "whose": whose,
                "files": sorted(p.name for p in own.iterdir()),
            }
        else:
            own = tmp_path / f"own{rank}"
            try:
                resuming.agree(own, resuming.find_folders(own), keep=3, rank=rank)
            except UsageError as err:
                result = {"error": str(err)}
    finally:
        distributed.shutdown()
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))


def _run(tmp_path, scenario):
    mp.spawn(_rank, args=(free_port(), scenario, tmp_path), nprocs=2)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_each_folder_is_written_once_and_a_folder_behind_receives_the_newest(tmp_path):
    checkpoint.save(_state(1), tmp_path / "own0", epoch=1)
    checkpoint.save(_state(2, 2.0), tmp_path / "own1", epoch=2)
    checkpoint.write(_state(2, 9.0), tmp_path / "own1" / "best.pt")
    first, second = _run(tmp_path, "folders")
    # One folder shared by both ranks: rank 0 writes it. A folder each: each writes its own.
    assert first["shared"][:2] == [True, 1] and second["shared"][:2] == [False, 1]
    assert first["own"][:2] == second["own"][:2] == [True, 2]
    # Each call's token, the same on every rank: sample records count ids once a round.
    assert first["shared"][2] == second["shared"][2] != first["own"][2] == second["own"][2]
    assert first["epoch"] == second["epoch"] == 2  # the newest, from rank 1's folder
    assert "rank 1's folder" in first["whose"]
    assert first["files"] == ["best.pt", "ckpt-epoch0001.pt", "ckpt-epoch0002.pt"]
    stored = torch.load(tmp_path / "own0" / "best.pt", weights_only=True)
    assert stored["model"]["w"].tolist() == [9.0] * 3  # the sender's best.pt came with it
    assert not list(tmp_path.glob("*/.probe-*"))  # the round's files are gone


def test_two_different_checkpoints_at_one_position_stop_the_job_naming_both(tmp_path):
    checkpoint.save(_state(2, 1.0), tmp_path / "own0", epoch=2)
    checkpoint.save(_state(2, 2.0), tmp_path / "own1", epoch=2)
    first, second = _run(tmp_path, "conflict")
    assert "two different checkpoints are both ckpt-epoch0002.pt" in first["error"]
    assert "rank 0's on" in first["error"] and "rank 1's on" in first["error"]
    assert second == {"error": ""}  # one message, from rank 0
    # Nothing was overwritten or set aside.
    assert checkpoint.load_latest(tmp_path / "own1")[0]["model"]["w"].tolist() == [2.0] * 3


def test_the_same_state_saved_in_two_folders_hashes_equal_and_another_does_not(tmp_path):
    one = checkpoint.save(_state(1), tmp_path / "a", epoch=1).read_bytes()
    two = checkpoint.save(_state(1), tmp_path / "b", epoch=1).read_bytes()
    # Two processes write different serialization ids (test_elastic's machines compare those).
    assert checkpoint.content_hash(one) == checkpoint.content_hash(two)
    other = checkpoint.save(_state(1, 1.0), tmp_path / "c", epoch=1).read_bytes()
    assert checkpoint.content_hash(other) != checkpoint.content_hash(one)


class _Payload:
    """What a rogue sender would put in a checkpoint: code that runs when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_a_peer_sends_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="does not decode as torch.load"):
        resuming.decode(evil.read_bytes(), "rank 0's folder on elsewhere")
    assert not marker.exists()
    raw = pickle.dumps(_Payload(marker))  # not even an archive
    with pytest.raises(CheckpointError):
        resuming.decode(raw, "rank 0's folder on elsewhere")
    assert not marker.exists()
