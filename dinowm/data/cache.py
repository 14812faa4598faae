"""The frozen encoder's features of every frame of a dataset, computed once (training.feature_cache)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .. import distributed
from .windows import preprocess_images


class FeatureCache:
    """Frozen-encoder features of every frame, computed once up front.

    Exact, not an approximation: the encoder is frozen and deterministic, so its output for a frame
    never changes. Filled in frame order in fixed chunks, so the cache is the same in every run
    (and exact resume does not depend on which frames the first batches happened to touch).

    Under torchrun (rank of world_size) every rank encodes every world_size-th chunk into a zeroed
    table and one all-reduce (a sum with zeros: exact) gives every rank the whole table, in
    1/world_size of the time.
    """

    def __init__(self, model, frames: torch.Tensor, img_size: int, device: torch.device, dtype: torch.dtype,
                 chunk: int = 32, progress: bool = True, rank: int = 0, world_size: int = 1):
        n = frames.shape[0]
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            # the table's shape and dtype: the encoder's own output (fp32 under autocast: final LayerNorm)
            probe = model.encode_visual(preprocess_images(frames[:1].to(device), img_size)[None])[0]
            self.features = torch.zeros((n,) + tuple(probe.shape[1:]), dtype=probe.dtype, device=device)
            for start in tqdm(range(chunk * rank, n, chunk * world_size), desc="caching encoder features",
                              unit="chunk", disable=not progress, leave=False):
                obs = preprocess_images(frames[start:start + chunk].to(device), img_size)  # (C, 3, S, S)
                self.features[start:start + chunk] = model.encode_visual(obs[None])[0]  # (C, P, 384)
        distributed.all_reduce_sum(self.features)

    def __getitem__(self, frame_index: torch.Tensor) -> torch.Tensor:
        """frame_index: (B, T) global frame ids -> (B, T, P, 384)."""
        return self.features[frame_index.to(self.features.device)]
