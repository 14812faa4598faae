"""The Franka cube-stacking dataset on disk (docs/contract.md §1): loading and validation.

Layout of a dataset folder:

    <root>/states.pth        float32 (N, T_max, 22)   ee_pos(3) | ee_quat(4) | gripper(1) | joint_pos(7) | joint_vel(7)
    <root>/actions.pth       float32 (N, T_max, 9)    joint targets(7) | finger targets(2)
    <root>/seq_lengths.pkl   list[int] of length N    valid steps per episode; rows past it are padding
    <root>/metadata.pkl      dict                     free-form
    <root>/NNNNNN/obses.pth  uint8 (T_i, H, W, 3)     RGB frames of episode i (T_i = seq_lengths[i])

Everything is loaded once. The frames of all episodes are concatenated into ONE uint8 tensor
`frames: (sum_i T_i, H, W, 3)` with `frame_offsets: (N + 1,)`, so a sample gathers its frames with one
indexing op and DataLoader workers never touch the disk (the original loaded per episode and called
`torch.load` in workers, which deadlocked).

Every problem raises a `DatasetError` whose message names the file, says what is wrong and what to
do; nothing is skipped silently. Episodes too short for a sample are not an error here (the sample
length depends on num_frames and frameskip): `FrameWindows` warns about and counts them.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dinowm.errors import UserError
from dinowm.safe_pickle import RefusedPickle, load_pickle

STATE_DIM = 22
ACTION_DIM = 9
REQUIRED_FILES = ("states.pth", "actions.pth", "seq_lengths.pkl", "metadata.pkl")


class DatasetError(UserError, ValueError):
    """A problem with the dataset on disk, phrased for the user: the file, what is wrong, what to do."""


@dataclass
class FrankaDataset:
    root: Path
    states: Tensor
    """(N, T_max, 22) float32; rows t >= seq_lengths[i] are padding."""
    actions: Tensor
    """(N, T_max, 9) float32, raw (not normalised)."""
    seq_lengths: list[int]
    metadata: dict
    frames: Tensor | None
    """uint8 (sum_i T_i, H, W, 3): the valid frames of all episodes, concatenated; None with load_frames=False."""
    frame_offsets: Tensor
    """(N + 1,) int64; episode i is frames[frame_offsets[i] : frame_offsets[i + 1]]."""

    @property
    def num_episodes(self) -> int:
        return len(self.seq_lengths)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the frames, or None when they were not loaded."""
        return None if self.frames is None else (int(self.frames.shape[1]), int(self.frames.shape[2]))

    def episode_frames(self, i: int) -> Tensor:
        """uint8 (T_i, H, W, 3), a view into `frames`."""
        if self.frames is None:
            raise ValueError("frames were not loaded (load_franka_dataset(..., load_frames=False))")
        return self.frames[int(self.frame_offsets[i]) : int(self.frame_offsets[i + 1])]


def episode_dir(root: Path, i: int) -> Path:
    return Path(root) / f"{i:06d}"


def is_dataset_dir(path: str | Path) -> bool:
    """True if `path` looks like a dataset folder (it holds states.pth); says nothing about validity."""
    return (Path(path) / "states.pth").is_file()


def load_franka_dataset(root: str | Path, load_frames: bool = True, state_dim: int = STATE_DIM,
                        action_dim: int = ACTION_DIM) -> FrankaDataset:
    """Load and validate a dataset folder (layout in the module docstring).

    Returns states (N, T_max, 22) and actions (N, T_max, 9) as float32, seq_lengths, metadata and, with
    `load_frames`, all frames concatenated (sum_i T_i, H, W, 3) uint8. Raises DatasetError on any problem.
    state_dim / action_dim: the widths the files must have (the Franka layout by default; 0: any width,
    e.g. another arm's, taken from the files).
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"{root}: dataset folder {what}; set data.path (or --data.path) to a folder holding "
                           f"{', '.join(REQUIRED_FILES)} and NNNNNN/obses.pth")
    for name in REQUIRED_FILES:
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: file missing; a dataset folder needs {', '.join(REQUIRED_FILES)} "
                               f"(docs/contract.md §1); check data.path points at the dataset itself, not its parent")

    states = _load_array(root / "states.pth", "states", state_dim, "data.state_dim")
    actions = _load_array(root / "actions.pth", "actions", action_dim, "data.action_dim")
    if actions.shape[:2] != states.shape[:2]:
        raise DatasetError(f"{root / 'actions.pth'}: shape {tuple(actions.shape)} does not match states.pth "
                           f"{tuple(states.shape)} in (episodes, steps); both must be (N, T_max, .) for the same N and T_max")
    n, t_max = int(states.shape[0]), int(states.shape[1])
    seq_lengths = _load_seq_lengths(root / "seq_lengths.pkl", n, t_max)
    metadata = _load_pickle(root / "metadata.pkl")
    if not isinstance(metadata, dict):
        raise DatasetError(f"{root / 'metadata.pkl'}: expected a dict, got {type(metadata).__name__}; "
                           f"write a (possibly empty) dict")
    _check_finite(states, seq_lengths, root / "states.pth")
    _check_finite(actions, seq_lengths, root / "actions.pth")

    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(seq_lengths, dtype=torch.int64), 0)
    frames = _load_frames(root, seq_lengths, int(offsets[-1])) if load_frames else None
    extra = sorted(d.name for d in root.iterdir() if d.is_dir() and len(d.name) == 6 and d.name.isdigit()
                   and int(d.name) >= n)
    if extra:
        warnings.warn(f"{root}: {len(extra)} episode folder(s) from {extra[0]} on are not in states.pth / actions.pth "
                      f"({n} episodes) and are ignored; re-export the arrays if they belong to the dataset")
    return FrankaDataset(root=root, states=states, actions=actions, seq_lengths=seq_lengths,
                         metadata=metadata, frames=frames, frame_offsets=offsets)


# ----------------------------------------------------------------------------------------------
# file readers: each turns any failure into one DatasetError naming the file


def _load_tensor(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file missing (a Franka-format dataset folder holds {', '.join(REQUIRED_FILES)} "
                           f"and NNNNNN/obses.pth for every episode)") from None
    except Exception as e:  # unpickling errors come in many types
        raise DatasetError(f"{path}: cannot be read as a torch file ({type(e).__name__}: {_first_line(e)}); "
                           f"the file is corrupt, not written with torch.save, or holds objects other than tensors: "
                           f"re-export it as torch.save(tensor, path)") from None
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if isinstance(obj, Tensor) and obj.layout != torch.strided:
        raise DatasetError(f"{path}: a {obj.layout} tensor; save a dense one (torch.save(x.to_dense(), path))")
    if not isinstance(obj, Tensor):
        raise DatasetError(f"{path}: expected a tensor, got {type(obj).__name__}; save it with torch.save(tensor, path)")
    return obj


def _load_pickle(path: Path):
    try:
        return load_pickle(path)
    except RefusedPickle as e:
        raise DatasetError(str(e)) from None
    except Exception as e:
        raise DatasetError(f"{path}: cannot be read as a pickle ({type(e).__name__}: {_first_line(e)}); "
                           f"the file is corrupt or not written with pickle.dump: re-export it") from None


def _load_array(path: Path, name: str, dim: int, key: str) -> Tensor:
    x = _load_tensor(path)
    if x.dim() == 3 and dim and x.shape[-1] != dim:
        raise DatasetError(f"{path}: {name} must have shape (N_episodes, T_max, {dim}), got {tuple(x.shape)}; "
                           f"for another robot's layout set {key} = {x.shape[-1]} (or 0: take the width from the file)")
    if x.dim() != 3:
        raise DatasetError(f"{path}: {name} must have shape (N_episodes, T_max, {dim or 'D'}), got {tuple(x.shape)}; "
                           f"re-export it in the Franka format (docs/contract.md §1)")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise DatasetError(f"{path}: {name} must be float32, got {x.dtype}; re-export it as float32")
    if x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] < 1:
        raise DatasetError(f"{path}: {name} is empty (shape {tuple(x.shape)}); the dataset needs at least one episode "
                           f"of at least one step with at least one value")
    return x.to(torch.float32).contiguous()


def _load_seq_lengths(path: Path, n: int, t_max: int) -> list[int]:
    obj = _load_pickle(path)
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype.kind in "iu":
        obj = obj.tolist()
    elif isinstance(obj, Tensor) and obj.dim() == 1 and not obj.is_floating_point() and obj.dtype != torch.bool:
        obj = obj.tolist()
    if not isinstance(obj, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in obj):
        raise DatasetError(f"{path}: seq_lengths must be a list of ints (valid steps per episode), got "
                           f"{_describe(obj)}; write list(int(t) for t in lengths)")
    lengths = [int(v) for v in obj]
    if len(lengths) != n:
        rel = "longer" if len(lengths) > n else "shorter"
        raise DatasetError(f"{path}: {len(lengths)} lengths but states.pth holds {n} episodes ({rel} than states); "
                           f"seq_lengths needs exactly one entry per episode")
    for i, t in enumerate(lengths):
        if not 1 <= t <= t_max:
            raise DatasetError(f"{path}: episode {i} has length {t}, outside [1, T_max = {t_max}] of states.pth; "
                               f"fix the length or the padding of states/actions")
    return lengths


def _check_finite(x: Tensor, lengths: list[int], path: Path) -> None:
    """Non-finite values inside the valid steps are an error (padding rows may hold anything)."""
    valid = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # (N, T_max)
    bad = ~torch.isfinite(x) & valid[..., None]
    if bad.any():
        i, t, d = (int(v) for v in bad.nonzero()[0])
        raise DatasetError(f"{path}: non-finite value {x[i, t, d].item()} at episode {i}, step {t}, dim {d} "
                           f"({int(bad.sum())} in total within the valid steps); clean or drop the episode")


def _load_frames(root: Path, lengths: list[int], total: int) -> Tensor:
    """Read every NNNNNN/obses.pth into one preallocated (total, H, W, 3) uint8 tensor (peak memory: total + one episode)."""
    frames = None
    first = None
    offset = 0
    for i, t in enumerate(lengths):
        path = episode_dir(root, i) / "obses.pth"
        if not path.is_file():
            raise DatasetError(f"{path}: file missing; episode {i} of {len(lengths)} (seq_lengths.pkl) needs its "
                               f"frames as uint8 (T, H, W, 3)")
        obs = _load_tensor(path)
        if obs.dtype != torch.uint8:
            raise DatasetError(f"{path}: frames must be uint8 RGB, got {obs.dtype}; convert with "
                               f"(x * 255).round().clamp(0, 255).to(torch.uint8) if they are floats in [0, 1]")
        if obs.dim() != 4 or obs.shape[-1] != 3 or obs.shape[1] < 1 or obs.shape[2] < 1:
            raise DatasetError(f"{path}: frames must have shape (T, H, W, 3) (RGB, channels last), got "
                               f"{tuple(obs.shape)}; permute channels-first frames with x.permute(0, 2, 3, 1)")
        if obs.shape[0] != t:
            raise DatasetError(f"{path}: {obs.shape[0]} frames but seq_lengths.pkl says episode {i} has {t} steps; "
                               f"they must agree (one frame per step)")
        if frames is None:
            first = path
            frames = torch.empty((total, *obs.shape[1:]), dtype=torch.uint8)
        elif obs.shape[1:] != frames.shape[1:]:
            raise DatasetError(f"{path}: frame size {tuple(obs.shape[1:3])} differs from {tuple(frames.shape[1:3])} "
                               f"of {first}; all episodes must have the same image size")
        frames[offset : offset + t] = obs
        offset += t
        del obs
    return frames


def _describe(obj) -> str:
    if isinstance(obj, (list, tuple)):
        bad = next((v for v in obj if not (isinstance(v, numbers.Integral) and not isinstance(v, bool))), None)
        return f"a {type(obj).__name__} containing {bad!r} ({type(bad).__name__})"
    return type(obj).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line[:200]


__all__ = ["DatasetError", "FrankaDataset", "load_franka_dataset", "is_dataset_dir", "episode_dir",
           "STATE_DIM", "ACTION_DIM"]