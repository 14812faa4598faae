"""Loading and validation of the Franka dataset format (docs/contract.md §1), and build_data."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinowm.config import DataConfig
from dinowm.data import DataBundle, build_data
from dinowm.data.dataset import DatasetError, load_franka_dataset
from franka_fixtures import CASES



def test_load_valid_dataset(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    assert ds.num_episodes == 3
    assert ds.seq_lengths == [12, 9, 15]
    assert ds.states.shape == (3, 15, 22) and ds.states.dtype == torch.float32
    assert ds.actions.shape == (3, 15, 9) and ds.actions.dtype == torch.float32
    assert ds.metadata == {"fps": 10, "camera": "front"}
    assert ds.frame_offsets.tolist() == [0, 12, 21, 36] and ds.frame_offsets.dtype == torch.int64
    assert ds.frames.shape == (36, 32, 32, 3) and ds.frames.dtype == torch.uint8
    for e in range(3):
        on_disk = torch.load(franka_dataset / f"{e:06d}" / "obses.pth")
        assert torch.equal(ds.frames[ds.frame_offsets[e] : ds.frame_offsets[e + 1]], on_disk)
        assert torch.equal(ds.episode_frames(e), on_disk)
        assert (ds.episode_frames(e)[:, 0, 0, 0] == e + 1).all()  # the fixture's encoding


def test_frames_are_one_tensor_not_copies(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    assert ds.episode_frames(1).data_ptr() == ds.frames[12].data_ptr()  # a view, held once


def test_load_without_frames(franka_dataset):
    ds = load_franka_dataset(franka_dataset, load_frames=False)
    assert ds.frames is None and ds.frame_offsets.tolist() == [0, 12, 21, 36]


def test_non_square_frames_and_padding_values_are_accepted(make_franka_dataset):
    root = make_franka_dataset(lengths=(5, 7), t_max=10, hw=(8, 12))
    states = torch.load(root / "states.pth")
    states[0, 5:] = float("nan")  # padding may hold anything
    torch.save(states, root / "states.pth")
    ds = load_franka_dataset(root)
    assert ds.frames.shape == (12, 8, 12, 3) and ds.states.shape == (2, 10, 22)


def test_seq_lengths_numpy_ints_accepted(make_franka_dataset):
    root = make_franka_dataset(lengths=(5, 7))
    with open(root / "seq_lengths.pkl", "wb") as f:
        pickle.dump([np.int64(5), np.int64(7)], f)
    assert load_franka_dataset(root).seq_lengths == [5, 7]


# ----------------------------------------------------------------------------------------------
# every validation error: (mutation of a valid 3-episode dataset (12, 9, 15 steps), file named, words)


@pytest.mark.parametrize("case", list(CASES))
def test_validation_error(make_franka_dataset, case):
    mutate, file, words = CASES[case]
    root = make_franka_dataset()
    mutate(root)
    with pytest.raises(DatasetError) as info:
        load_franka_dataset(root)
    msg = str(info.value)
    assert str(root / file) in msg, msg
    assert words in msg, msg
    assert "\n" not in msg  # one line
    assert info.value.__cause__ is None and info.value.__suppress_context__ or info.value.__context__ is None


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_missing_root(tmp_path, kind):
    root = tmp_path / "nope"
    if kind == "file":
        root.write_text("x")
    with pytest.raises(DatasetError, match="dataset folder") as info:
        load_franka_dataset(root)
    assert str(root) in str(info.value) and "data.path" in str(info.value)


def test_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


# ----------------------------------------------------------------------------------------------
# build_data


def test_build_data(franka_dataset):
    cfg = DataConfig(path=str(franka_dataset), frameskip=3, num_hist=3, num_pred=1, split_ratio=0.7, split_seed=42)
    with pytest.warns(UserWarning, match=r"shorter than 12 steps .* episodes \[1\] with lengths \[9\]"):
        data = build_data(cfg)  # episode 1 (9 steps) is in one of the two splits
    assert isinstance(data, DataBundle)
    assert sorted(data.train_ids + data.val_ids) == [0, 1, 2] and len(data.train_ids) == 2
    assert data.proprio_slice == slice(0, 3)
    assert data.train.num_frames == data.val.num_frames == 4 and data.train.frameskip == 3
    lengths = [12, 9, 15]
    assert len(data.train) == sum(max(lengths[e] - 12 + 1, 0) for e in data.train_ids)
    assert len(data.val) == sum(max(lengths[e] - 12 + 1, 0) for e in data.val_ids)
    assert data.train.num_short_episodes + data.val.num_short_episodes == 1
    assert data.stats.proprio_mean.shape == (3,)
    batch = data.train.batch(torch.arange(len(data.train)))
    assert batch["action"].shape == (len(data.train), 4, 27)


def test_build_data_reuses_given_stats(franka_dataset):
    cfg = DataConfig(path=str(franka_dataset), frameskip=1, num_hist=2, num_pred=1)
    first = build_data(cfg)
    stats = type(first.stats).from_dict({k: [2.0] * len(v) for k, v in first.stats.to_dict().items()})
    again = build_data(cfg, stats=stats)
    assert again.stats is stats
    raw = again.dataset.actions[again.train.sample_episode[0], again.train.sample_start[0]]
    assert torch.allclose(again.train[0]["action"][0], (raw - 2.0) / 2.0)


def test_build_data_rejects_stats_of_another_proprio(franka_dataset):
    cfg = DataConfig(path=str(franka_dataset), frameskip=1, num_hist=2, num_pred=1)
    stats = build_data(cfg).stats
    with pytest.raises(ValueError, match="proprio has 3 dims but data.proprio_start/proprio_end select 4"):
        build_data(DataConfig(path=str(franka_dataset), frameskip=1, num_hist=2, num_pred=1, proprio_end=4), stats=stats)


def test_build_data_compat_normalization(franka_dataset):
    ours = build_data(DataConfig(path=str(franka_dataset), frameskip=1, num_hist=2, num_pred=1)).stats
    compat = build_data(DataConfig(path=str(franka_dataset), frameskip=1, num_hist=2, num_pred=1,
                                   normalization="compat")).stats
    assert not torch.allclose(ours.action_mean, compat.action_mean)


@pytest.mark.parametrize("path", ["", "   "])
def test_build_data_empty_path(path):
    with pytest.raises(DatasetError, match=r"data\.path is empty.*--data\.path"):
        build_data(DataConfig(path=path))


def test_build_data_missing_path_without_demo(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_data(DataConfig(path=str(tmp_path / "absent")))


def test_build_data_too_few_episodes_for_training(make_franka_dataset):
    root = make_franka_dataset(lengths=(12,))
    with pytest.raises(DatasetError, match="no episode for training"):
        build_data(DataConfig(path=str(root), frameskip=1))


def test_build_data_generates_demo_dataset_in_a_child_process(tmp_path):
    """The demo dataset is rendered in a child process: rendering (Mesa llvmpipe) followed by
    `import triton` in one process segfaults, and the trainer imports Triton."""
    pytest.importorskip("mujoco")
    pytest.importorskip("triton")
    root = tmp_path / "demo"
    code = f"""
import os, sys
from dinowm.config import DataConfig
from dinowm.data import build_data
cfg = DataConfig(path={str(root)!r}, demo_episodes=2, demo_frames=40, frameskip=2)
data = build_data(cfg)
assert "mujoco" not in sys.modules, "rendering must stay in the child process"
import triton  # crashed here when this process had rendered
written = os.stat({str(root / "metadata.pkl")!r}).st_mtime_ns
build_data(cfg)  # present now: loaded, not generated again
assert os.stat({str(root / "metadata.pkl")!r}).st_mtime_ns == written
print("episodes", data.dataset.num_episodes, "frames", data.dataset.frames.shape[0])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["episodes", "2", "frames", "80"]


def test_episode_folders_beyond_the_arrays_are_named(make_franka_dataset):
    root = make_franka_dataset()  # 3 episodes
    (root / "000003").mkdir()
    with pytest.warns(UserWarning, match=r"1 episode folder\(s\) from 000003 on are not in states.pth"):
        assert load_franka_dataset(root).num_episodes == 3
