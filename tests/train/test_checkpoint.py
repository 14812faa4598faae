import os
import random

import pytest
import torch

from dinowm.checkpoint import CheckpointError, atomic_save, capture_rng_state, load_checkpoint, restore_rng_state


def test_atomic_save_leaves_old_file_intact_on_failure(tmp_path):
    path = tmp_path / "model_latest.pt"
    atomic_save({"format": "dinowm/1", "model": {}, "x": torch.arange(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"format": "dinowm/1", "model": {}, "x": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["model_latest.pt"]  # no temporary file left behind


def test_atomic_save_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"format": "dinowm/1", "model": {}}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: cannot be read"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 3, "predictor": None}, foreign)
    with pytest.raises(CheckpointError, match="import-dino-wm"):
        load_checkpoint(foreign)


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), torch.rand(3))
    restore_rng_state(state)
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
