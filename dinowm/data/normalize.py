"""Z-score statistics for actions and proprio (docs/contract.md §2).

    x_norm = (x - mean) / std        per dimension, on raw per-step values (before frameskip concatenation)

Statistics are computed over the VALID steps of episodes only (padding rows past seq_lengths excluded),
in float64, and stored as float32:

- mode "train" (ours): over the given training episodes, population std (divide by n).
- mode "compat" (the original): over ALL episodes (validation included, `episode_ids` ignored), unbiased
  std (divide by n - 1).

In both modes a dimension that is constant over those steps (std < 1e-6, e.g. a finger target that never
moves) gets std 1: it is centred, not scaled. The original divides by zero there; a tiny floor instead
would multiply any later value that differs (validation, planning) by up to a million.

States are not normalised. The statistics travel with every checkpoint (`to_dict` / `from_dict`) so
evaluation and rollouts reuse them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dataset import FrankaDataset

STD_FLOOR = 1e-6  # below it a dimension counts as constant: std 1
MODES = ("train", "compat")
_FIELDS = ("action_mean", "action_std", "proprio_mean", "proprio_std")


@dataclass
class NormStats:
    action_mean: Tensor
    """(9,) float32"""
    action_std: Tensor
    """(9,) float32, >= 1e-6"""
    proprio_mean: Tensor
    """(Dp,) float32"""
    proprio_std: Tensor
    """(Dp,) float32, >= 1e-6"""

    def normalize_action(self, a: Tensor) -> Tensor:
        """a: (..., 9) raw -> (..., 9) normalised."""
        return (a - self.action_mean.to(a.device)) / self.action_std.to(a.device)

    def denormalize_action(self, a: Tensor) -> Tensor:
        """a: (..., 9) normalised -> (..., 9) raw."""
        return a * self.action_std.to(a.device) + self.action_mean.to(a.device)

    def normalize_proprio(self, p: Tensor) -> Tensor:
        """p: (..., Dp) raw -> (..., Dp) normalised."""
        return (p - self.proprio_mean.to(p.device)) / self.proprio_std.to(p.device)

    def to_dict(self) -> dict:
        """{name: list[float]}: plain Python values, safe for torch.save(weights_only) and JSON alike."""
        return {k: getattr(self, k).detach().cpu().to(torch.float32).tolist() for k in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "NormStats":
        """Inverse of to_dict; also accepts tensors as values."""
        missing = [k for k in _FIELDS if k not in d]
        if missing:
            raise ValueError(f"normalisation statistics: missing {', '.join(missing)} (have {', '.join(map(str, d))})")
        values = {}
        for k in _FIELDS:
            try:
                values[k] = torch.as_tensor(d[k], dtype=torch.float32).detach().cpu().clone().reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"normalisation statistics: {k} is not a list of numbers "
                                 f"({type(d[k]).__name__})") from None
        stats = cls(**values)
        stats.check()
        return stats

    def check(self, proprio_dim: int | None = None, action_dim: int | None = None) -> "NormStats":
        """Shapes (Da,) / (Dp,) (Franka: 9 / 3), means and stds paired, finite, std > 0; optionally
        Dp == proprio_dim and Da == action_dim."""
        a, p = self.action_mean.shape, self.proprio_mean.shape
        problems = []
        if len(a) != 1 or self.action_std.shape != a or (action_dim is not None and a[0] != action_dim):
            expected = f"({action_dim},)" if action_dim is not None else "(Da,)"
            problems.append(f"action mean/std have shapes {tuple(a)}/{tuple(self.action_std.shape)}, expected {expected}")
        if len(p) != 1 or self.proprio_std.shape != p:
            problems.append(f"proprio mean/std have shapes {tuple(p)}/{tuple(self.proprio_std.shape)}, expected (Dp,)")
        elif proprio_dim is not None and p[0] != proprio_dim:
            problems.append(f"proprio has {p[0]} dims but data.proprio_start/proprio_end select {proprio_dim}")
        for k in _FIELDS:
            v = getattr(self, k)
            if not torch.isfinite(v).all():
                problems.append(f"{k} is not finite")
        if (self.action_std <= 0).any() or (self.proprio_std <= 0).any():
            problems.append("a std is <= 0")
        if problems:
            raise ValueError("normalisation statistics: " + "; ".join(problems)
                             + " (they must come from a run with the same data settings)")
        return self


def compute_norm_stats(ds: FrankaDataset, episode_ids, proprio_slice: slice, mode: str = "train") -> NormStats:
    """Statistics over the valid steps of `episode_ids` ("train") or of all episodes ("compat")."""
    if mode not in MODES:
        raise ValueError(f"normalisation mode {mode!r} is not one of {', '.join(map(repr, MODES))}")
    ids = list(range(ds.num_episodes)) if mode == "compat" else [int(i) for i in episode_ids]
    if not ids:
        raise ValueError("normalisation statistics need at least one episode (got an empty list of training episodes)")
    actions = torch.cat([ds.actions[i, : ds.seq_lengths[i]] for i in ids]).double()  # (n, 9)
    proprio = torch.cat([ds.states[i, : ds.seq_lengths[i], proprio_slice] for i in ids]).double()  # (n, Dp)
    correction = 1 if mode == "compat" else 0
    if correction and actions.shape[0] < 2:
        raise ValueError("normalisation mode 'compat' (unbiased std) needs at least 2 valid steps in total")

    def mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
        std = x.std(dim=0, correction=correction)
        std = torch.where(std < STD_FLOOR, torch.ones_like(std), std)  # constant: centred, not scaled
        return x.mean(dim=0).float(), std.float()

    am, asd = mean_std(actions)
    pm, psd = mean_std(proprio)
    return NormStats(action_mean=am, action_std=asd, proprio_mean=pm, proprio_std=psd)
