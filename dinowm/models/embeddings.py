"""Proprio and action embeddings (docs/contract.md §4): a per-timestep linear layer written as Conv1d(k=1).

The Conv1d form keeps the original parameter names and shapes (`patch_embed.weight (emb, in, 1)`,
`patch_embed.bias (emb,)`) so original checkpoints load directly. PyTorch default init.
In the world model the fused `kernels.tiled_embedding` uses these weights directly (squeezed);
`forward` is the plain form (rollouts, concat_dim = 0, tests).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ProprioceptiveEmbedding(nn.Module):
    """x: (B, T, in_chans) -> (B, T, emb_dim). Used for both proprio and action."""

    def __init__(self, in_chans: int, emb_dim: int):
        super().__init__()
        self.in_chans = in_chans
        self.emb_dim = emb_dim
        self.patch_embed = nn.Conv1d(in_chans, emb_dim, kernel_size=1)

    @property
    def weight(self) -> torch.Tensor:
        """The Conv1d weight as a Linear weight: (emb_dim, in_chans)."""
        return self.patch_embed.weight.squeeze(-1)

    @property
    def bias(self) -> torch.Tensor:
        return self.patch_embed.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conv1d(k=1) over time == Linear per timestep: (B, T, in) -> (B, T, emb). Never under autocast: the
        # embeddings have one precision on every path (docs/contract.md §4), like the fused kernel's.
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, self.weight, self.bias)
