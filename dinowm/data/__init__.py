"""Data: the Franka dataset format and its validation, normalisation, sample windows, loaders.

`build_data(cfg.data)` is the one call the trainer makes: load + validate -> split by episode ->
statistics -> training and validation windows of num_hist + num_pred frames.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from .cache import FeatureCache
from .dataset import DatasetError, FrankaDataset, is_dataset_dir, load_franka_dataset
from .normalize import NormStats, compute_norm_stats
from .windows import EpochBatchSampler, FrameWindows, make_loader, preprocess_images, split_episodes

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    dataset: FrankaDataset
    stats: NormStats
    train_ids: list[int]
    val_ids: list[int]
    train: FrameWindows
    val: FrameWindows
    proprio_slice: slice


def generate_demo_dataset(root: Path, episodes: int, frames: int) -> None:
    """Generate the simulated demo dataset at root in a child process.

    A child, because rendering loads Mesa's llvmpipe (its own LLVM) and importing Triton afterwards in
    the same process crashes (segfault); the trainer imports Triton when it picks kernel backends.
    """
    logger.info("generating a demo dataset of %d episodes x %d frames at %s", episodes, frames, root)
    command = [sys.executable, "-m", "dinowm.data.sim", "--demo", "--out", str(root),
               "--episodes", str(episodes), "--frames", str(frames)]
    if subprocess.run(command).returncode != 0:  # the child printed its one-line error
        raise DatasetError(f"{root}: generating the demo dataset failed (see the error above; command: "
                           f"{' '.join(command)})")


def build_data(cfg: DataConfig, stats: NormStats | None = None) -> DataBundle:
    """Load and validate cfg.path (generating the demo dataset first if asked), split, normalise, window.

    `stats` (e.g. from a checkpoint on resume) are reused instead of recomputed.
    """
    if not str(cfg.path).strip():
        raise DatasetError("data.path is empty: set data.path in the config (or pass --data.path /path/to/dataset) "
                           "to a dataset folder in the Franka format; data.demo_episodes > 0 generates a demo "
                           "dataset at that path")
    root = Path(cfg.path).expanduser()
    if cfg.demo_episodes > 0 and not is_dataset_dir(root):
        generate_demo_dataset(root, cfg.demo_episodes, cfg.demo_frames)
    ds = load_franka_dataset(root)
    proprio_slice = slice(cfg.proprio_start, cfg.proprio_end)

    train_ids, val_ids = split_episodes(ds.num_episodes, cfg.split_ratio, cfg.split_seed)
    if not train_ids:
        raise DatasetError(f"{root}: {ds.num_episodes} episode(s) with data.split_ratio = {cfg.split_ratio} leave "
                           f"no episode for training; add episodes or raise data.split_ratio")
    if stats is None:
        stats = compute_norm_stats(ds, train_ids, proprio_slice, mode=cfg.normalization)
    else:
        stats.check(proprio_dim=len(range(22)[proprio_slice]))

    num_frames = cfg.num_hist + cfg.num_pred
    train = FrameWindows(ds, train_ids, num_frames, cfg.frameskip, stats, proprio_slice)
    val = FrameWindows(ds, val_ids, num_frames, cfg.frameskip, stats, proprio_slice, allow_empty=True)
    logger.info("data %s: %d episodes (%d train / %d val), %d / %d samples of %d frames (frameskip %d), frames %s",
                root, ds.num_episodes, len(train_ids), len(val_ids), len(train), len(val), num_frames,
                cfg.frameskip, ds.image_size)
    return DataBundle(dataset=ds, stats=stats, train_ids=train_ids, val_ids=val_ids, train=train, val=val,
                      proprio_slice=proprio_slice)


__all__ = ["DataBundle", "build_data", "DatasetError", "FrankaDataset", "load_franka_dataset", "NormStats",
           "compute_norm_stats", "FrameWindows", "EpochBatchSampler", "make_loader", "preprocess_images",
           "split_episodes"]
