"""The frozen encoder's features of every frame of a dataset, computed once (training.feature_cache)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .. import distributed
from .windows import preprocess_images

CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FeatureCache:
    """Frozen-encoder features of every frame, computed once up front.

    fp32 (training.feature_cache_dtype): exact, not an approximation: the encoder is frozen and
    deterministic, so its output for a frame never changes. bf16 halves the table; each feature is then
    rounded to bf16 once (relative error at most 2^-8 per element) and read back as the encoder's dtype.
    Filled in frame order in fixed chunks, so the cache is the same in every run (and exact resume
    does not depend on which frames the first batches happened to touch).

    The table is computed on `device` and kept on `store_device` (data.device_store: the training
    device, or host memory, where a lookup is gathered, pinned and copied without blocking).

    Under torchrun (rank of world_size) every rank encodes every world_size-th chunk into a zeroed
    table and an all-reduce (a sum with zeros: exact) gives every rank the whole table, in
    1/world_size of the time.
    """

    def __init__(self, model, frames: torch.Tensor, img_size: int, device: torch.device, dtype: torch.dtype,
                 chunk: int = 32, progress: bool = True, rank: int = 0, world_size: int = 1,
                 store_device: torch.device | None = None, store_dtype: torch.dtype | None = None):
        n = frames.shape[0]
        self.device = device
        store_device = store_device or device
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            # the output dtype: the encoder's own (fp32 under autocast: final LayerNorm)
            probe = model.encode_visual(preprocess_images(frames[:1].to(device), img_size)[None])[0]
            self.dtype = probe.dtype
            self.features = torch.zeros((n,) + tuple(probe.shape[1:]), dtype=store_dtype or probe.dtype,
                                        device=store_device)
            for start in tqdm(range(chunk * rank, n, chunk * world_size), desc="caching encoder features",
                              unit="chunk", disable=not progress, leave=False):
                obs = preprocess_images(frames[start:start + chunk].to(device), img_size)  # (C, 3, S, S)
                self.features[start:start + chunk] = model.encode_visual(obs[None])[0]  # (C, P, D)
        self._all_reduce(chunk * 64)

    def _all_reduce(self, rows: int) -> None:
        """Sum the ranks' tables; a host table goes through the device in blocks of rows (NCCL needs device
        tensors, and the whole table may not fit there)."""
        if not distributed.current().enabled:
            return
        if self.features.device == self.device or self.device.type == "cpu":
            distributed.all_reduce_sum(self.features)
            return
        for start in range(0, self.features.shape[0], rows):
            block = self.features[start:start + rows].to(self.device)
            self.features[start:start + rows] = distributed.all_reduce_sum(block).cpu()

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def __getitem__(self, frame_index: torch.Tensor) -> torch.Tensor:
        """frame_index: (B, T) global frame ids -> (B, T, P, D) on the training device, in the encoder's dtype."""
        x = self.features[frame_index.to(self.features.device)]
        if x.device != self.device:  # host store: pinned, so the copy does not block the host
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.dtype)
