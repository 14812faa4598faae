"""Split, sample windows, batch sampler, loader and image preprocessing (docs/contract.md §2).

The fixture datasets encode their origin in the values (see conftest.py):
    actions[e, t, d] = 1000 e + 10 t + d / 10,   states[e, t, d] = 1000 e + 10 t + d / 100,
    frame (e, t) has pixel (0, 0) = (e + 1, t % 255 + 1, t // 255 + 1).
With identity statistics the gathered values can be checked exactly.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from dinowm.data.dataset import DatasetError, load_franka_dataset
from dinowm.data.normalize import NormStats, compute_norm_stats
from dinowm.data.windows import (EpochBatchSampler, FrameWindows, make_loader, preprocess_images,
                                 split_episodes)


def identity_stats(dp: int = 3) -> NormStats:
    return NormStats(torch.zeros(9), torch.ones(9), torch.zeros(dp), torch.ones(dp))


# ----------------------------------------------------------------------------------------------
# split


def test_split_matches_the_original_with_seed_42():
    # the original: randperm(10, generator=torch.Generator().manual_seed(42)), first int(0.9 * 10) train
    train, val = split_episodes(10, 0.9, 42)
    assert train == [2, 6, 1, 8, 4, 5, 0, 9, 3] and val == [7]
    g = torch.Generator().manual_seed(42)
    perm = torch.randperm(10, generator=g).tolist()
    assert train + val == perm


@pytest.mark.parametrize("n, ratio", [(10, 0.9), (7, 0.5), (3, 0.7), (1, 0.9), (25, 0.8)])
def test_split_is_a_deterministic_partition(n, ratio):
    train, val = split_episodes(n, ratio, seed=3)
    assert len(train) == int(ratio * n)
    assert sorted(train + val) == list(range(n))
    assert (train, val) == split_episodes(n, ratio, seed=3)


def test_split_depends_on_seed():
    assert split_episodes(20, 0.5, 0) != split_episodes(20, 0.5, 1)


# ----------------------------------------------------------------------------------------------
# windows


def test_913_samples_per_932_step_episode(make_franka_dataset):
    root = make_franka_dataset(lengths=(932, 20, 19, 932), hw=(8, 8))
    ds = load_franka_dataset(root, load_frames=False)
    with pytest.warns(UserWarning, match=r"1 of 4 episodes are shorter than 20 steps .* episodes \[2\] with lengths \[19\]"):
        w = FrameWindows(ds, [0, 1, 2, 3], num_frames=4, frameskip=5, stats=identity_stats(), proprio_slice=slice(0, 3))
    assert w.samples_per_episode == [913, 1, 0, 913]
    assert len(w) == 913 + 1 + 913
    assert w.short_episodes == [2] and w.num_short_episodes == 1
    last = w[912]  # frames 912, 917, 922, 927 of episode 0; actions up to step 931
    assert last["start"] == 912 and last["episode"] == 0
    assert last["frame_index"].tolist() == [912, 917, 922, 927]
    assert last["action"][-1, -9:].tolist() == pytest.approx([10 * 931 + d / 10 for d in range(9)])
    assert "obs" not in last  # frames not loaded


def test_windows_gather_exact_values(make_franka_dataset):
    root = make_franka_dataset(lengths=(12, 9, 15), t_max=17, hw=(8, 8))
    ds = load_franka_dataset(root)
    fs, nf = 2, 3
    ids = [2, 0, 1]
    w = FrameWindows(ds, ids, num_frames=nf, frameskip=fs, stats=identity_stats(4), proprio_slice=slice(3, 7))
    counts = [15 - 6 + 1, 12 - 6 + 1, 9 - 6 + 1]
    assert w.samples_per_episode == counts and len(w) == sum(counts)
    b = w.batch(torch.arange(len(w)))
    assert b["obs"].shape == (len(w), nf, 8, 8, 3) and b["obs"].dtype == torch.uint8
    assert b["proprio"].shape == (len(w), nf, 4) and b["proprio"].dtype == torch.float32
    assert b["action"].shape == (len(w), nf, 9 * fs) and b["action"].dtype == torch.float32
    assert b["state"].shape == (len(w), nf, 22) and b["state"].dtype == torch.float32
    assert b["frame_index"].shape == (len(w), nf) and b["frame_index"].dtype == torch.int64
    assert b["episode"].dtype == b["start"].dtype == torch.int64
    i = 0
    offsets = [0, 12, 21]
    for e, count in zip(ids, counts):
        for s in range(count):  # samples ordered by episode (in ids order), then start
            assert (b["episode"][i], b["start"][i]) == (e, s)
            for k in range(nf):
                t = s + k * fs
                assert b["frame_index"][i, k] == offsets[e] + t
                assert torch.equal(b["obs"][i, k], ds.frames[offsets[e] + t])
                assert b["obs"][i, k, 0, 0].tolist() == [e + 1, t % 255 + 1, t // 255 + 1]
                assert b["state"][i, k].tolist() == pytest.approx([1000 * e + 10 * t + d / 100 for d in range(22)])
                assert b["proprio"][i, k].tolist() == pytest.approx([1000 * e + 10 * t + d / 100 for d in range(3, 7)])
                # time-major: [a[t], a[t + 1], ..., a[t + fs - 1]], 9 dims each
                expected = [1000 * e + 10 * (t + j) + d / 10 for j in range(fs) for d in range(9)]
                assert b["action"][i, k].tolist() == pytest.approx(expected)
            i += 1
    assert i == len(w)


def test_actions_are_normalised_before_concatenation(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    stats = compute_norm_stats(ds, [0, 1], slice(0, 3))
    w = FrameWindows(ds, [0, 1, 2], num_frames=2, frameskip=3, stats=stats, proprio_slice=slice(0, 3))
    s = w[5]
    e, start = int(s["episode"]), int(s["start"])
    raw = ds.actions[e, start : start + 6]  # (6, 9)
    expected = ((raw - stats.action_mean) / stats.action_std).reshape(2, 27)
    torch.testing.assert_close(s["action"], expected)
    steps = torch.tensor([start, start + 3])
    torch.testing.assert_close(s["proprio"], (ds.states[e, steps, :3] - stats.proprio_mean) / stats.proprio_std)
    torch.testing.assert_close(s["state"], ds.states[e, steps])  # states are not normalised


def test_getitem_matches_batch_and_getitems(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    w = FrameWindows(ds, [0, 2], num_frames=4, frameskip=1, stats=identity_stats(), proprio_slice=slice(0, 3))
    idx = [3, 0, len(w) - 1, 3]
    b = w.__getitems__(idx)
    for j, i in enumerate(idx):
        one = w[i]
        assert set(one) == set(b)
        for k in b:
            assert torch.equal(one[k], b[k][j]), k
    for k in b:
        assert torch.equal(w[-1][k], w[len(w) - 1][k])
    with pytest.raises(IndexError):
        w[len(w)]
    with pytest.raises(IndexError):
        w.batch(torch.tensor([0, len(w)]))


def test_rollout_windows_with_long_horizon_on_validation_episodes(make_franka_dataset):
    """num_frames = num_hist + horizon (3 + 5) over validation episodes, as the rollout evaluation uses them."""
    root = make_franka_dataset(lengths=(60, 45, 39, 52), hw=(8, 8))
    ds = load_franka_dataset(root)
    _, val_ids = split_episodes(4, 0.5, 42)
    with pytest.warns(UserWarning, match="shorter than 40 steps"):
        w = FrameWindows(ds, [*val_ids, 2], num_frames=8, frameskip=5, stats=identity_stats(), proprio_slice=slice(0, 3))
    lengths = [60, 45, 39, 52]
    assert w.samples_per_episode == [max(lengths[e] - 40 + 1, 0) for e in [*val_ids, 2]]
    s = w[0]
    assert s["obs"].shape == (8, 8, 8, 3) and s["action"].shape == (8, 45) and s["proprio"].shape == (8, 3)
    e = val_ids[0]
    assert s["frame_index"].tolist() == [int(ds.frame_offsets[e]) + 5 * k for k in range(8)]


def test_no_usable_episode_is_an_error_naming_the_minimum(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    with pytest.raises(DatasetError, match=r"4 \* 5 = 20 valid steps.*longest.*has 15") as info:
        FrameWindows(ds, [0, 1, 2], num_frames=4, frameskip=5, stats=identity_stats(), proprio_slice=slice(0, 3))
    assert str(franka_dataset) in str(info.value)
    with pytest.warns(UserWarning, match="3 of 3 episodes"):
        empty = FrameWindows(ds, [0, 1, 2], 4, 5, identity_stats(), slice(0, 3), allow_empty=True)
    assert len(empty) == 0 and empty.num_short_episodes == 3
    none = FrameWindows(ds, [], 4, 1, identity_stats(), slice(0, 3))
    assert len(none) == 0 and len(make_loader(none, 4, True, 0, False)) == 0


def test_stats_must_match_proprio_slice(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    with pytest.raises(ValueError, match="proprio has 3 dims but .* select 4"):
        FrameWindows(ds, [0], 2, 1, identity_stats(3), slice(0, 4))


# ----------------------------------------------------------------------------------------------
# batch sampler


def _epoch(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_sampler_reshuffles_every_epoch_reproducibly():
    s = EpochBatchSampler(50, 8, shuffle=True, seed=7, drop_last=False)
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    assert len(s) == 7 == len(e0) and [len(b) for b in e0] == [8] * 6 + [2]
    assert sorted(sum(e0, [])) == list(range(50)) == sorted(sum(e1, []))
    assert e0 != e1
    assert e0 == _epoch(EpochBatchSampler(50, 8, True, seed=7, drop_last=False), 0)
    assert e1 == _epoch(EpochBatchSampler(50, 8, True, seed=7, drop_last=False), 1)
    assert e0 != _epoch(EpochBatchSampler(50, 8, True, seed=8, drop_last=False), 0)
    orders = {tuple(sum(_epoch(s, e), [])) for e in range(10)}
    assert len(orders) == 10


def test_sampler_advances_epoch_after_a_full_pass():
    s = EpochBatchSampler(20, 4, shuffle=True, seed=0, drop_last=False)
    first, second = list(s), list(s)
    assert first == _epoch(EpochBatchSampler(20, 4, True, 0, False), 0)
    assert second == _epoch(EpochBatchSampler(20, 4, True, 0, False), 1)


def test_sampler_exact_resume_mid_epoch():
    full = _epoch(EpochBatchSampler(37, 5, shuffle=True, seed=11, drop_last=True), 3)
    assert len(full) == 7 and all(len(b) == 5 for b in full)
    resumed = EpochBatchSampler(37, 5, shuffle=True, seed=11, drop_last=True)  # a fresh process after restart
    assert _epoch(resumed, 3, start=4) == full[4:]
    assert list(resumed) == _epoch(EpochBatchSampler(37, 5, True, 11, True), 4)  # then the next epoch, whole
    assert _epoch(resumed, 3, start=7) == []
    with pytest.raises(ValueError, match="start_batch 8"):
        resumed.set_epoch(3, 8)


def test_sampler_without_shuffle():
    s = EpochBatchSampler(10, 4, shuffle=False, seed=0, drop_last=False)
    assert _epoch(s, 0) == _epoch(s, 5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(EpochBatchSampler(10, 4, False, 0, drop_last=True)) == 2


# ----------------------------------------------------------------------------------------------
# loader


def test_loader_batches_are_window_batches(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    w = FrameWindows(ds, [0, 1, 2], 3, 2, identity_stats(), slice(0, 3))
    loader = make_loader(w, batch_size=4, shuffle=True, seed=0, drop_last=False)
    assert isinstance(loader.batch_sampler, EpochBatchSampler) and len(loader) == -(-len(w) // 4)
    loader.batch_sampler.set_epoch(2)
    expected = _epoch(EpochBatchSampler(len(w), 4, True, 0, False), 2)
    got = list(loader)
    assert len(got) == len(expected)
    for batch, idx in zip(got, expected):
        ref = w.batch(torch.tensor(idx))
        assert set(batch) == set(ref) and all(torch.equal(batch[k], ref[k]) for k in ref)


def test_two_workers_deliver_the_same_batches_as_none(franka_dataset):
    ds = load_franka_dataset(franka_dataset)
    w = FrameWindows(ds, [2, 0, 1], 3, 2, identity_stats(), slice(0, 3))

    def run(num_workers):
        loader = make_loader(w, batch_size=3, shuffle=True, seed=5, drop_last=False, num_workers=num_workers)
        out = []
        for epoch, start in [(0, 0), (1, 0), (1, 4)]:  # two epochs, then a mid-epoch resume
            loader.batch_sampler.set_epoch(epoch, start)
            out.append(list(loader))
        return out

    t0 = time.perf_counter()
    with_workers = run(2)
    assert time.perf_counter() - t0 < 120
    assert ds.frames.is_shared()
    without = run(0)
    assert [len(e) for e in without] == [len(e) for e in with_workers] == [7, 7, 3]
    order = [[(int(e), int(st)) for b in epoch for e, st in zip(b["episode"], b["start"])] for epoch in without]
    assert order[0] != order[1] and sorted(order[0]) == sorted(order[1])  # reshuffled
    assert order[2] == order[1][4 * 3 :]  # exact resume
    for epoch_a, epoch_b in zip(without, with_workers):
        for a, b in zip(epoch_a, epoch_b):
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# images


def test_preprocess_images_shape_and_range():
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=g)
    obs[0, 0] = 0
    obs[0, 1] = 255
    x = preprocess_images(obs, 16)
    assert x.shape == (2, 4, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0, 0], torch.full((3, 16, 16), -1.0))
    assert torch.equal(x[0, 1], torch.full((3, 16, 16), 1.0))
    ref = F.interpolate(obs.reshape(8, 32, 32, 3).permute(0, 3, 1, 2).float(), size=(16, 16), mode="bilinear",
                        align_corners=False, antialias=True) / 255 * 2 - 1
    torch.testing.assert_close(x.reshape(8, 3, 16, 16), ref)


def test_preprocess_images_same_size_is_exact_scaling():
    obs = torch.arange(256, dtype=torch.uint8).repeat(3 * 16 * 16 // 256 + 1)[: 16 * 16 * 3].reshape(16, 16, 3)
    x = preprocess_images(obs, 16)  # no batch dims
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, obs.permute(2, 0, 1).float() / 255 * 2 - 1)


def test_preprocess_images_upsamples_and_rejects_floats():
    assert preprocess_images(torch.full((1, 8, 8, 3), 7, dtype=torch.uint8), 24).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images(torch.zeros(1, 8, 8, 3), 8)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 8)
