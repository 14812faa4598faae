"""Checkpoints: written atomically, resumed exactly.

A checkpoint is one `torch.save`d dict (format "dinowm/1"):

    format        "dinowm/1"
    model         VWorldModel state dict (encoder keys omitted when the encoder comes from a weights file)
    optimizers    {"predictor", "embeddings", "decoder"}: optimiser state dicts
    norm_stats    NormStats.to_dict(): the statistics evaluation and rollouts must reuse
    config        Config.to_dict() of the run
    step, epoch, batch_in_epoch   where training stands (batch_in_epoch > 0: interrupted mid-epoch)
    rng           python / numpy / torch CPU / CUDA generator states (tensors and primitives), and the
                  model's Triton dropout seeds ("dropout_seeds", kernels/dropout.py; absent in older files)

Everything in it is a tensor or a primitive (dict, list, tuple, str, int, float, bool, None), so
`load_checkpoint` reads it with `torch.load(weights_only=True)`: a crafted file cannot run code.
Fields added later must keep to that.

Atomic: the file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target, so a crash never leaves a truncated `model_latest.pt`; a temporary file left by a
killed write is removed by `remove_stale_temp_files` when the next run starts. A full disk is a
CheckpointError saying "no space left on <dir>" (the previous checkpoint is untouched).
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from dinowm.errors import UserError
from kernels import dropout

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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if _is_disk_full(e):
            kept = f"the previous {path.name} is unchanged" if path.exists() else f"{path.name} was not written"
            raise CheckpointError(f"no space left on {path.parent} while writing {path.name} ({kept}); free some "
                                  f"space or set another run folder, then continue with --resume") from None
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the chain: torch.save reports a failed write as its own RuntimeError ("unexpected
    pos ...") raised while handling the OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_TEMP_GLOB = ".*.tmp"  # atomic_save's temporary names: .<target name>.<random>.tmp


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files a killed `atomic_save` left in `folder`; returns them. Call before writing."""
    stale = [p for p in Path(folder).glob(_TEMP_GLOB) if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict:
    """Load and check one of our checkpoints (a file, or a run folder holding checkpoints/model_latest.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "model_latest.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint here (expected a run folder or a .pt file written by train.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused is None:
            raise CheckpointError(f"{path}: cannot be read as a checkpoint (corrupt or not written by torch.save: "
                                  f"{(str(e).splitlines() or [''])[0][:200]})") from None
        raise CheckpointError(f"{path}: refused to load {refused.group(1)}: a checkpoint holds only tensors and "
                              f"primitives (nothing in the file was executed); a file from an original DINO-WM run "
                              f"must be converted with `python -m dinowm.compat import-dino-wm`") from None
    except Exception as e:  # corrupt or truncated file
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not a dinowm checkpoint (format {CHECKPOINT_FORMAT!r} expected); "
            "original DINO-WM checkpoints must be converted with `python -m dinowm.compat import-dino-wm`"
        )
    if not isinstance(ckpt.get("model"), dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in ckpt["model"].items()):
        raise CheckpointError(f"{path}: the checkpoint's 'model' entry is not a dict of named tensors "
                              f"(got {type(ckpt.get('model')).__name__}); it holds no usable model weights")
    return ckpt


RESUME_KEYS = ("optimizers", "norm_stats", "config", "step", "epoch", "batch_in_epoch", "rng")


def check_resumable(ckpt: dict, path) -> None:
    """A checkpoint written by the trainer, with everything --resume needs."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: holds model weights only (no {', '.join(missing)}), e.g. an imported original checkpoint; "
            f"start a new run from it with --init-from {path}")


def capture_rng_state(model=None) -> dict:
    """Generator states as tensors and primitives (loadable with weights_only=True); with a model, also the
    state of its DropoutSeed modules (the Triton attention's dropout stream, device state)."""
    version, internal, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # the training device's only: a resume may see other or fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state(_cuda_device(model))
    if model is not None:
        state["dropout_seeds"] = dropout.get_states(model)
    return state


def _cuda_device(model) -> torch.device:
    """The CUDA device whose generator the run draws from: the model's, else the current one."""
    device = next(model.parameters()).device if model is not None else None
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def restore_rng_state(state: dict, model=None) -> None:
    """The inverse of capture_rng_state. A checkpoint from before dropout seeds were saved leaves the
    model's as they are (seeded from training.seed): the continuation draws other Triton dropout masks."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        device = _cuda_device(model)
        saved = state["cuda"]
        if isinstance(saved, list):  # older checkpoints: one state per GPU visible then
            saved = saved[device.index] if device.index < len(saved) else saved[0]
        torch.cuda.set_rng_state(saved, device)
    if model is not None and "dropout_seeds" in state:
        dropout.set_states(model, state["dropout_seeds"])
