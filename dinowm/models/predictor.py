"""DINO-WM predictor (`ViTPredictor`, docs/contract.md §5): a pre-norm ViT over a frame-major token sequence
with a frame-block-causal mask.

    x: (B, F*P, dim), F <= num_frames frames of P = num_patches tokens each, frame-major
    x = x + pos_embedding[:, :F*P]                         learned, (1, num_frames*P, dim), N(0, 1) init
                                                            (N(0, pos_init_std^2) as an option)
    x = dropout_emb(x)
    depth x:
        h = LN(x) @ W_qkv                                   (no bias; dim -> 3 * heads * dim_head)
        a = softmax(q k^T / sqrt(dim_head) + mask) v        mask: token i sees j iff frame(j) <= frame(i)
        x = x + dropout(a @ W_out + b_out)                  (heads * dim_head -> dim)
        x = x + dropout(W2 dropout(GELU(LN(x) @ W1 + b1)) + b2)
    x = LN(x)                                               (eps 1e-5)

Initialisation: PyTorch's defaults and a N(0, 1) position embedding, as the original. Two options
(off in franka.toml) start the predictor at "copy the input frame" instead, which on small data is the
difference between learning the dynamics in minutes and first spending epochs learning to undo the
random initialisation: `pos_init_std` (e.g. 0.02: the embedding no longer swamps the unit-variance
DINOv2 features) and `zero_init_residual` (the last Linear of every attention / MLP branch starts at
zero, so every block starts as the identity and the output is LayerNorm(input + position embedding)).

Kernels: LN -> Linear pairs go through `kernels.layernorm_linear`, attention through
`kernels.block_causal_attention` (attention-probability dropout inside). The frame layouts (frame ids,
per-frame token counts, Triton tile lists) of 1 .. num_frames frames are built at construction, so the
forward and backward trace under torch.compile(fullgraph=True) without host reads. The Triton
attention's dropout seed is device state (`dropout_seed`, kernels/dropout.py) that every training-mode
forward advances in place by itself: a captured CUDA graph draws new masks each replay, and the trainer
has nothing to advance (it saves and restores the state with the RNG states for exact resume). Backends are options; the
fp32 "reference model" of parity tests is this model with backend "reference".

State-dict keys are exactly those of the original (docs/contract.md §10): `pos_embedding`,
`transformer.layers.{i}.0.{norm, to_qkv, to_out.0}`, `transformer.layers.{i}.1.net.{0 (LN), 1, 4}`,
`transformer.norm`; an original checkpoint loads with `load_state_dict` directly.
Parameters at 196 patches, 3 frames, dim 404 (defaults): 20,122,600.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels import block_causal_attention, frame_ids_for, layernorm_linear
from kernels.dropout import DropoutSeed
from kernels.frames import FrameLayout


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, backend: str, ln_backend: str):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.dropout = dropout
        self.backend = backend
        self.ln_backend = ln_backend
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, layout: FrameLayout, seed: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = layernorm_linear(x, self.norm.weight, self.norm.bias, self.to_qkv.weight, None,
                               self.norm.eps, backend=self.ln_backend)  # (B, N, 3 * H * Dh)
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        out = block_causal_attention(q, k, v, layout, scale=self.scale,
                                     dropout_p=self.dropout if self.training else 0.0,
                                     backend=self.backend, seed=seed)  # (B, H, N, Dh)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, H * Dh)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, ln_backend: str):
        super().__init__()
        self.ln_backend = ln_backend
        # the original's Sequential(LN, Linear, GELU, Dropout, Linear, Dropout): keys net.0, net.1, net.4
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, fc1, act, drop1, fc2, drop2 = self.net
        h = layernorm_linear(x, norm.weight, norm.bias, fc1.weight, fc1.bias, norm.eps,
                             backend=self.ln_backend)  # (B, N, hidden)
        return drop2(fc2(drop1(act(h))))


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout, backend, ln_backend):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([Attention(dim, heads, dim_head, dropout, backend, ln_backend),
                           FeedForward(dim, mlp_dim, dropout, ln_backend)])
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)

    activation_checkpointing = False  # training.activation_checkpointing (set by dinowm.perf.configure)

    def forward(self, x: torch.Tensor, layout: FrameLayout, seed: torch.Tensor | None = None) -> torch.Tensor:
        """seed: the first layer's dropout seed (layer i uses seed + i), or None (no attention dropout)."""
        for i, (attn, ff) in enumerate(self.layers):
            layer_seed = None if seed is None else seed + i
            if self.activation_checkpointing and torch.is_grad_enabled():
                # recomputed in the backward pass with the same RNG state and the same seed tensor: the
                # same dropout masks
                x = checkpoint(_block, attn, ff, x, layout, layer_seed, use_reentrant=False)
            else:
                x = _block(attn, ff, x, layout, layer_seed)
        return self.norm(x)


def _block(attn: Attention, ff: FeedForward, x: torch.Tensor, layout: FrameLayout,
           seed: torch.Tensor | None) -> torch.Tensor:
    x = x + attn(x, layout, seed)
    return x + ff(x)


class ViTPredictor(nn.Module):
    """x: (B, F*num_patches, dim), F <= num_frames, frame-major -> same shape."""

    def __init__(self, num_patches: int, num_frames: int, dim: int = 404, depth: int = 6, heads: int = 16,
                 dim_head: int = 64, mlp_dim: int = 2048, dropout: float = 0.1, emb_dropout: float = 0.0,
                 attention_backend: str = "auto", layernorm_linear_backend: str = "auto", pos_init_std: float = 1.0,
                 zero_init_residual: bool = False):
        super().__init__()
        self.num_patches = num_patches
        self.num_frames = num_frames
        self.dim = dim
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames * num_patches, dim) * pos_init_std)
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout,
                                       attention_backend, layernorm_linear_backend)
        # the frame structure of every sequence length the predictor accepts (1 .. num_frames frames),
        # built once here (non-persistent buffers: they follow .to(), are not in the state dict)
        self.layouts = nn.ModuleDict({str(f): FrameLayout(frame_ids_for(f, num_patches), dim_head)
                                      for f in range(1, num_frames + 1)})
        self.depth = depth
        self.attention_dropout = dropout
        self.dropout_seed = DropoutSeed()  # the Triton attention's masks (kernels/dropout.py)
        if zero_init_residual:
            for attn, ff in self.transformer.layers:
                nn.init.zeros_(attn.to_out[0].weight)
                nn.init.zeros_(ff.net[4].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if n % self.num_patches != 0 or n > self.pos_embedding.shape[1] or d != self.dim:
            raise ValueError(f"ViTPredictor: input (B, N, D) = {tuple(x.shape)} must have D = {self.dim} and "
                             f"N a multiple of num_patches {self.num_patches}, at most {self.num_frames} frames")
        layout = self.layouts[str(n // self.num_patches)]
        seed = None
        if self.training and self.attention_dropout > 0.0:  # one value per call, advanced in place
            seed = self.dropout_seed.next(self.depth)
        x = self.dropout(x + self.pos_embedding[:, :n])
        return self.transformer(x, layout, seed)
