"""Where the frame store and the feature cache live (data.device_store), decided once at start.

"device": the uint8 frames, the per-step proprio/action tables and the feature cache are moved to the
training device once; a batch is gathered there by index (the sampler's indices are the only thing
copied per step) and resized / scaled to [-1, 1] there. On CPU the device is host memory: the same
gather code runs in the tests.

"host": the tables stay in host memory and a DataLoader gathers batches there (with data.num_workers
worker processes if asked); on CUDA the batches and cached features are copied from pinned memory
with non-blocking copies.

"auto" picks "device" when the estimate (frames + features) takes at most DEVICE_SHARE of the free
device memory (the rest is for the model, its activations and the optimiser state), and "host"
otherwise or when data.num_workers > 0 asks for worker processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError

DEVICE_SHARE = 0.5
"""auto: the store may take at most this fraction of the free device memory."""

GiB = 2**30


@dataclass(frozen=True)
class StorePlan:
    placement: str
    """'device' (gathered where the model runs) or 'host' (DataLoader, pinned copies on CUDA)."""
    reason: str
    """One phrase saying why, for the log."""

    @property
    def on_device(self) -> bool:
        return self.placement == "device"


def estimate_store_bytes(num_frames: int, frame_shape: tuple[int, ...], feature_shape: tuple[int, ...] | None,
                         feature_dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the uint8 frame store and of the feature cache (feature_shape (P, D) per frame; None: no cache)."""
    frames = num_frames * _numel(frame_shape)
    features = 0 if feature_shape is None else num_frames * _numel(feature_shape) * feature_dtype.itemsize
    return {"frames": frames, "features": features, "total": frames + features}


def plan_store(mode: str, device: torch.device, need_bytes: int, free_bytes: int | None,
               num_workers: int = 0) -> StorePlan:
    """The decision of data.device_store = auto | device | host (free_bytes: free device memory; None on CPU)."""
    need = f"{need_bytes / GiB:.2f} GiB"
    if mode == "host":
        return StorePlan("host", "data.device_store = host")
    if device.type == "cpu":  # the device is host memory: nothing to copy
        if mode == "auto" and num_workers > 0:
            return StorePlan("host", f"data.num_workers = {num_workers}: worker processes gather the batches")
        return StorePlan("device", f"training on the CPU: the {need} store is in host memory already")
    if mode == "device":
        if need_bytes > free_bytes:
            raise ConfigError(f"data.device_store = device: the store needs {need} but {device} has only "
                              f"{free_bytes / GiB:.2f} GiB free; use --data.device_store auto (or host)")
        return StorePlan("device", f"data.device_store = device ({need} of {free_bytes / GiB:.2f} GiB free)")
    if num_workers > 0:
        return StorePlan("host", f"data.num_workers = {num_workers}: worker processes gather the batches")
    budget = DEVICE_SHARE * free_bytes
    if need_bytes <= budget:
        return StorePlan("device", f"{need} fits in {DEVICE_SHARE:.0%} of the {free_bytes / GiB:.2f} GiB free")
    return StorePlan("host", f"{need} exceeds {DEVICE_SHARE:.0%} of the {free_bytes / GiB:.2f} GiB free "
                             f"on {device}")


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None for the CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def place_windows(windows, device: torch.device) -> None:
    """Move every tensor the batches of these FrameWindows read to `device`, in place; tensors they share
    (the dataset's frame store) are moved once."""
    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, kept alive: ids stay unique)

    def move(x: torch.Tensor) -> torch.Tensor:
        if id(x) not in moved:
            moved[id(x)] = x, x.to(device)
        return moved[id(x)][1]

    for w in windows:
        if w is not None:
            w.apply_(move)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
