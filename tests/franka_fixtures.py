"""Tiny Franka-format datasets (docs/contract.md §1) for tests: `write_franka_dataset(root, lengths, hw)`.

Values encode where they come from, so gathers can be checked exactly:
    actions[e, t, d] = 1000 e + 10 t + d / 10   (valid steps; padding rows are 1e6)
    states[e, t, d]  = 1000 e + 10 t + d / 100  (likewise)
    frames of episode e, step t: random values in [1, 255], pixel (0, 0) = (e + 1, t % 255 + 1, t // 255 + 1)
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

PAD = 1.0e6


def encoded_actions(n: int, t_max: int, lengths) -> torch.Tensor:
    e = torch.arange(n, dtype=torch.float32)[:, None, None]
    t = torch.arange(t_max, dtype=torch.float32)[None, :, None]
    d = torch.arange(9, dtype=torch.float32)[None, None, :]
    a = 1000 * e + 10 * t + d / 10  # (N, T_max, 9)
    for i, length in enumerate(lengths):
        a[i, length:] = PAD
    return a


def encoded_states(n: int, t_max: int, lengths) -> torch.Tensor:
    e = torch.arange(n, dtype=torch.float32)[:, None, None]
    t = torch.arange(t_max, dtype=torch.float32)[None, :, None]
    d = torch.arange(22, dtype=torch.float32)[None, None, :]
    s = 1000 * e + 10 * t + d / 100  # (N, T_max, 22)
    for i, length in enumerate(lengths):
        s[i, length:] = PAD
    return s


def encoded_frames(e: int, length: int, hw: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + e)
    x = torch.randint(1, 256, (length, *hw, 3), dtype=torch.uint8, generator=g)  # never all-zero
    t = torch.arange(length)
    x[:, 0, 0, 0] = e + 1
    x[:, 0, 0, 1] = t % 255 + 1
    x[:, 0, 0, 2] = t // 255 + 1
    return x


def write_franka_dataset(root: Path, lengths=(12, 9, 15), t_max: int | None = None, hw=(32, 32),
                         metadata: dict | None = None, seed: int = 0) -> Path:
    """Write a valid dataset folder with len(lengths) episodes; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in lengths]
    n, t_max = len(lengths), t_max or max(lengths)
    torch.save(encoded_states(n, t_max, lengths), root / "states.pth")
    torch.save(encoded_actions(n, t_max, lengths), root / "actions.pth")
    with open(root / "seq_lengths.pkl", "wb") as f:
        pickle.dump(lengths, f)
    with open(root / "metadata.pkl", "wb") as f:
        pickle.dump(metadata if metadata is not None else {"fps": 10, "camera": "front"}, f)
    for e, length in enumerate(lengths):
        (root / f"{e:06d}").mkdir(exist_ok=True)
        torch.save(encoded_frames(e, length, hw, seed), root / f"{e:06d}" / "obses.pth")
    return root
