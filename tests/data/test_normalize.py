"""Normalisation statistics (docs/contract.md §2) against numpy, over valid steps only, both modes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from dinowm.data.dataset import load_franka_dataset
from dinowm.data.normalize import STD_FLOOR, NormStats, compute_norm_stats


def _random_dataset(root_factory, lengths=(12, 9, 15), t_max=20):
    """Random actions/states (padding rows set to a huge value so including them would show)."""
    root = root_factory(lengths=lengths, t_max=t_max, hw=(8, 8))
    g = torch.Generator().manual_seed(1)
    n = len(lengths)
    actions = torch.randn(n, t_max, 9, generator=g) * torch.linspace(0.01, 3, 9) + torch.arange(9)
    states = torch.randn(n, t_max, 22, generator=g) * 0.2 + torch.arange(22) / 10
    for i, length in enumerate(lengths):
        actions[i, length:] = 1e6
        states[i, length:] = -1e6
    torch.save(actions, root / "actions.pth")
    torch.save(states, root / "states.pth")
    return load_franka_dataset(root, load_frames=False)


def _valid(x: torch.Tensor, lengths, ids) -> np.ndarray:
    return np.concatenate([x[i, : lengths[i]].double().numpy() for i in ids])


@pytest.mark.parametrize("proprio_slice", [slice(0, 3), slice(3, 7), slice(15, 22)])
def test_train_mode_matches_numpy(make_franka_dataset, proprio_slice):
    ds = _random_dataset(make_franka_dataset)
    ids = [2, 0]
    stats = compute_norm_stats(ds, ids, proprio_slice, mode="train")
    a = _valid(ds.actions, ds.seq_lengths, ids)
    p = _valid(ds.states[..., proprio_slice], ds.seq_lengths, ids)
    assert a.shape == (27, 9)
    np.testing.assert_allclose(stats.action_mean.numpy(), a.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.action_std.numpy(), a.std(0, ddof=0), rtol=1e-6)
    np.testing.assert_allclose(stats.proprio_mean.numpy(), p.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.proprio_std.numpy(), p.std(0, ddof=0), rtol=1e-6)
    for v in (stats.action_mean, stats.action_std, stats.proprio_mean, stats.proprio_std):
        assert v.dtype == torch.float32
    assert stats.action_mean.shape == (9,) and stats.proprio_mean.shape == (proprio_slice.stop - proprio_slice.start,)


def test_compat_mode_matches_numpy_over_all_episodes(make_franka_dataset):
    ds = _random_dataset(make_franka_dataset)
    stats = compute_norm_stats(ds, [1], slice(0, 3), mode="compat")  # episode ids are ignored in compat
    a = _valid(ds.actions, ds.seq_lengths, [0, 1, 2])
    p = _valid(ds.states[..., :3], ds.seq_lengths, [0, 1, 2])
    assert a.shape == (36, 9)
    np.testing.assert_allclose(stats.action_mean.numpy(), a.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.action_std.numpy(), a.std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(stats.proprio_mean.numpy(), p.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.proprio_std.numpy(), p.std(0, ddof=1), rtol=1e-6)
    ours = compute_norm_stats(ds, [0, 1, 2], slice(0, 3), mode="train")
    assert torch.allclose(ours.action_mean, stats.action_mean)
    assert (stats.action_std > ours.action_std).all()  # unbiased > population on the same data


@pytest.mark.parametrize("mode", ["train", "compat"])
def test_a_constant_dimension_is_centred_not_scaled(make_franka_dataset, mode):
    ds = _random_dataset(make_franka_dataset)
    ds.actions[..., 7:] = 0.0  # fingers never move: std 0
    ds.states[..., 1] = 0.5
    stats = compute_norm_stats(ds, [0, 1], slice(0, 3), mode=mode)
    assert torch.equal(stats.action_std[7:], torch.ones(2)) and stats.proprio_std[1] == 1.0
    assert (stats.action_std[:7] > STD_FLOOR).all()
    normed = stats.normalize_action(ds.actions[0, :5])
    assert torch.isfinite(normed).all() and (normed[:, 7:] == 0).all()
    moved = ds.actions[0, :1].clone()
    moved[:, 7] = 0.01  # a finger that moves later (validation, planning) stays at its own scale
    assert stats.normalize_action(moved)[0, 7] == pytest.approx(0.01)


def test_padding_is_excluded(make_franka_dataset):
    ds = _random_dataset(make_franka_dataset)
    stats = compute_norm_stats(ds, [0, 1, 2], slice(0, 3))
    assert stats.action_mean.abs().max() < 100 and stats.proprio_mean.abs().max() < 100


def test_unknown_mode_and_empty_ids(franka_dataset):
    ds = load_franka_dataset(franka_dataset, load_frames=False)
    with pytest.raises(ValueError, match="'bogus' is not one of 'train', 'compat'"):
        compute_norm_stats(ds, [0], slice(0, 3), mode="bogus")
    with pytest.raises(ValueError, match="at least one episode"):
        compute_norm_stats(ds, [], slice(0, 3))


def test_normalize_denormalize_roundtrip():
    stats = NormStats(torch.arange(9.0), torch.full((9,), 2.0), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0]))
    a = torch.randn(4, 5, 9)
    assert torch.allclose(stats.normalize_action(a), (a - torch.arange(9.0)) / 2)
    assert torch.allclose(stats.denormalize_action(stats.normalize_action(a)), a, atol=1e-6)
    p = torch.randn(2, 3)
    assert torch.allclose(stats.normalize_proprio(p), (p - torch.tensor([1.0, 2.0, 3.0])) / torch.tensor([0.5, 1.0, 2.0]))


def test_dict_roundtrip_through_a_checkpoint(make_franka_dataset):
    ds = _random_dataset(make_franka_dataset)
    stats = compute_norm_stats(ds, [0, 1], slice(0, 3))
    d = stats.to_dict()
    assert set(d) == {"action_mean", "action_std", "proprio_mean", "proprio_std"}
    buf = io.BytesIO()
    torch.save({"norm_stats": d}, buf)
    buf.seek(0)
    back = NormStats.from_dict(torch.load(buf, weights_only=True)["norm_stats"])
    for k in d:
        assert torch.equal(getattr(back, k), getattr(stats, k)), k  # bit-exact
    tensors = NormStats.from_dict({k: getattr(stats, k) for k in d})  # tensors accepted too
    assert torch.equal(tensors.action_std, stats.action_std)


def test_from_dict_errors():
    good = {"action_mean": [0.0] * 9, "action_std": [1.0] * 9, "proprio_mean": [0.0] * 3, "proprio_std": [1.0] * 3}
    with pytest.raises(ValueError, match="missing proprio_std"):
        NormStats.from_dict({k: v for k, v in good.items() if k != "proprio_std"})
    with pytest.raises(ValueError, match="action mean/std have shapes \\(8,\\)/\\(9,\\)"):
        NormStats.from_dict({**good, "action_mean": [0.0] * 8})  # any width (another arm), but paired
    with pytest.raises(ValueError, match="expected \\(9,\\)"):
        NormStats.from_dict({**good, "action_mean": [0.0] * 7, "action_std": [1.0] * 7}).check(action_dim=9)
    with pytest.raises(ValueError, match="std is <= 0"):
        NormStats.from_dict({**good, "proprio_std": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="not finite"):
        NormStats.from_dict({**good, "action_mean": [float("nan")] * 9})
    with pytest.raises(ValueError, match="proprio has 3 dims"):
        NormStats.from_dict(good).check(proprio_dim=4)
