"""The frozen encoder's features of every frame of a dataset, computed once (training.feature_cache)."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .windows import preprocess_images


class FeatureCache:
    """Frozen-encoder features of every frame, computed once up front.

    Exact, not an approximation: the encoder is frozen and deterministic, so its output for a frame
    never changes. Filled in frame order in fixed chunks, so the cache is the same in every run
    (and exact resume does not depend on which frames the first batches happened to touch).
    """

    def __init__(self, model, frames: torch.Tensor, img_size: int, device: torch.device, dtype: torch.dtype,
                 chunk: int = 32, progress: bool = True):
        n = frames.shape[0]
        self.features = None
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for start in tqdm(range(0, n, chunk), desc="caching encoder features", unit="chunk",
                              disable=not progress, leave=False):
                obs = preprocess_images(frames[start:start + chunk].to(device), img_size)  # (C, 3, S, S)
                feats = model.encode_visual(obs[None])[0]  # (C, P, 384)
                if self.features is None:  # the encoder's own output dtype (fp32 under autocast: final LayerNorm)
                    self.features = torch.empty((n,) + tuple(feats.shape[1:]), dtype=feats.dtype, device=device)
                self.features[start:start + chunk] = feats

    def __getitem__(self, frame_index: torch.Tensor) -> torch.Tensor:
        """frame_index: (B, T) global frame ids -> (B, T, P, 384)."""
        return self.features[frame_index.to(self.features.device)]
