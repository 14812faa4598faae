"""Checkpoints: written atomically, resumed exactly.

A checkpoint is one `torch.save`d dict (format "dinowm/1"):

    format        "dinowm/1"
    model         VWorldModel state dict (encoder keys omitted when the encoder comes from a weights file)
    optimizers    {"predictor", "embeddings", "decoder"}: optimiser state dicts
    norm_stats    NormStats.to_dict(): the statistics evaluation and rollouts must reuse
    config        Config.to_dict() of the run
    step, epoch, batch_in_epoch   where training stands (batch_in_epoch > 0: interrupted mid-epoch)
    rng           python / numpy / torch CPU / CUDA generator states

Atomic: the file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target, so a crash never leaves a truncated `model_latest.pt`.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from dinowm.errors import UserError

CHECKPOINT_FORMAT = "dinowm/1"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, named with its path and what to do."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save(obj, path) through a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file torch.save's usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: str | Path) -> dict:
    """Load and check one of our checkpoints (a file, or a run folder holding checkpoints/model_latest.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "model_latest.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint here (expected a run folder or a .pt file written by train.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a dinowm checkpoint (format {CHECKPOINT_FORMAT!r} expected); "
            "original DINO-WM checkpoints must be converted with `python -m dinowm.compat import-dino-wm`"
        )
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: the checkpoint holds no model weights")
    return ckpt


RESUME_KEYS = ("optimizers", "norm_stats", "config", "step", "epoch", "batch_in_epoch", "rng")


def check_resumable(ckpt: dict, path) -> None:
    """A checkpoint written by the trainer, with everything --resume needs."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: holds model weights only (no {', '.join(missing)}), e.g. an imported original checkpoint; "
            f"start a new run from it with --init-from {path}")


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
