"""PNG grids for a person to look at: ground truth, reconstruction, prediction, rollouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """Save rows of images as one PNG. rows: list of (C, 3, H, W) tensors in [-1, 1] (same H, W).

    Rows may have different lengths; missing cells stay white.
    """
    arrays = [to_uint8(r) for r in rows]
    h, w = arrays[0].shape[1:3]
    cols = max(a.shape[0] for a in arrays)
    canvas = np.full((len(arrays) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(arrays):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
