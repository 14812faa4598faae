"""The frame structure of a token sequence, built once per token layout (imports no triton).

Every attention backend needs something derived from the frame ids: the per-frame prefix SDPA the
token count of every frame (Python ints: it slices by them), the Triton kernel its tile lists (which
(query block, key block) pairs are full, partial or skipped). Deriving them per call reads values to
the host (a graph break under torch.compile, a sync on CUDA) and repeats work in every layer, so a
model builds one `FrameLayout` per token layout at construction and passes it to
`kernels.block_causal_attention` instead of the frame-id tensor. Its tensors are non-persistent
buffers: they follow `.to(device)`, are graph inputs (not rebuilt) under torch.compile, and are not in
the state dict (checkpoints and imported weights are unaffected).

The Triton tile configurations (`AttentionConfig`, `CONFIGS`) and `block_maps` live here rather than
in kernels/attention.py so that a layout can be built where triton is not installed.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# Triton tile configurations
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tiles and launch parameters per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages) each."""

    fwd: tuple[int, int, int, int]
    dkdv: tuple[int, int, int, int]
    dq: tuple[int, int, int, int]

    def blocks(self) -> list[int]:
        """The six tile sizes, as the custom op takes them."""
        return [*self.fwd[:2], *self.dkdv[:2], *self.dq[:2]]


# One fixed config per (padded head dim, dropout) (no autotuning: it needs a driver). Checked by
# `python -m kernels.compile_check` to compile without spills on sm_80 and sm_90 with wgmma on sm_90.
# Dropout tiles are smaller: Philox keeps ~6 words of state per score element in registers.
CONFIGS = {
    (32, False): AttentionConfig(fwd=(128, 64, 4, 3), dkdv=(64, 64, 4, 2), dq=(64, 64, 4, 2)),
    (32, True): AttentionConfig(fwd=(128, 32, 8, 3), dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2)),
    (64, False): AttentionConfig(fwd=(128, 64, 8, 3), dkdv=(32, 64, 4, 2), dq=(64, 64, 4, 2)),
    (64, True): AttentionConfig(fwd=(128, 32, 8, 3), dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2)),
}
HEAD_DIMS = (24, 32, 64)
# The input dtypes `python -m kernels.compile_check` compiles the configs for (kernels/compile_specs.py).
# fp32/fp64 inputs run under the interpreter (tests) but on CUDA go to SDPA: no fp32 variant is checked.
CHECKED_DTYPES = (torch.float16, torch.bfloat16)


def pad_head_dim(head_dim: int) -> int:
    """The power of two (>= 32) a head dim is padded to in the kernels' tiles."""
    return max(32, 1 << (head_dim - 1).bit_length())


def config_for(head_dim: int, dropout: bool = False) -> AttentionConfig:
    pad = pad_head_dim(head_dim)
    if (pad, dropout) not in CONFIGS:
        raise ValueError(f"head dim {head_dim} unsupported by the Triton attention (max 64); use "
                         f"model.attention_backend = sdpa")
    return CONFIGS[pad, dropout]


def tile_sizes(head_dim: int) -> list[tuple[int, int]]:
    """Every (BLOCK_M, BLOCK_N) the shipped configs of this head dim use (with and without dropout)."""
    if pad_head_dim(head_dim) > 64:
        return []
    sizes = []
    for dropout in (False, True):
        cfg = config_for(head_dim, dropout)
        for bm, bn, *_ in (cfg.fwd, cfg.dkdv, cfg.dq):
            if (bm, bn) not in sizes:
                sizes.append((bm, bn))
    return sizes


def block_maps(frame_ids: torch.Tensor, block_m: int, block_n: int):
    """Tile lists from frame ids alone (a few small torch ops on frame_ids' device, no host read).

    Returns kv_count (M_blocks, 2), kv_idx (M_blocks, N_blocks), q_count (N_blocks, 2),
    q_idx (N_blocks, M_blocks), all int32: for each query block its full then partial key blocks,
    and for each key block its full then partial query blocks (see kernels/attention.py).
    """
    f = frame_ids.to(torch.int64)
    n = f.numel()
    big = torch.iinfo(torch.int64).max

    def block_min_max(block):
        pad = (-n) % block
        lo = torch.nn.functional.pad(f, (0, pad), value=big).view(-1, block).amin(1)  # (blocks,)
        hi = torch.nn.functional.pad(f, (0, pad), value=-1).view(-1, block).amax(1)
        ragged = torch.zeros_like(lo, dtype=torch.bool)
        ragged[-1] = pad > 0
        return lo, hi, ragged

    q_lo, q_hi, q_ragged = block_min_max(block_m)
    k_lo, k_hi, k_ragged = block_min_max(block_n)
    visit = k_lo[None, :] <= q_hi[:, None]  # (M_blocks, N_blocks): some allowed entry
    full = (k_hi[None, :] <= q_lo[:, None]) & ~q_ragged[:, None] & ~k_ragged[None, :]
    rank = torch.where(full, 0, torch.where(visit, 1, 2))  # full first, then partial, then skipped

    def lists(rank):
        order = torch.argsort(rank, dim=1, stable=True).to(torch.int32)
        count = torch.stack([(rank == 0).sum(1), (rank == 1).sum(1)], 1).to(torch.int32)
        return count.contiguous(), order.contiguous()

    kv_count, kv_idx = lists(rank)
    q_count, q_idx = lists(rank.t())
    return kv_count, kv_idx, q_count, q_idx


# ----------------------------------------------------------------------------------------------
# the layout
# ----------------------------------------------------------------------------------------------
_MAP_NAMES = ("kv_count", "kv_idx", "q_count", "q_idx")


class FrameLayout(nn.Module):
    """Frame ids of one token layout and what the attention backends derive from them.

    frame_ids: (N,) int (any order). head_dim: also build the Triton tile lists of every shipped
    config of that head dim (`tile_sizes`); None: none (the Triton path then derives them per call).

    Buffers (non-persistent): `frame_ids` (N,) int32; `sort_order`, `sort_inverse` (N,) int64, the
    stable sort by frame and its inverse (None when the ids are non-decreasing); the tile lists.
    Python: `counts`, the token count of every frame in frame order; `num_tokens`.
    """

    def __init__(self, frame_ids: torch.Tensor, head_dim: int | None = None):
        super().__init__()
        ids = frame_ids.detach().to("cpu", torch.int32).contiguous()
        self.register_buffer("frame_ids", ids, persistent=False)
        self.num_tokens = ids.numel()
        order = inverse = None
        if ids.numel() > 1 and bool((ids[1:] < ids[:-1]).any()):
            order = torch.argsort(ids, stable=True)
            inverse = torch.argsort(order)
        self.register_buffer("sort_order", order, persistent=False)
        self.register_buffer("sort_inverse", inverse, persistent=False)
        sorted_ids = ids if order is None else ids[order]
        self.counts = tuple(torch.unique_consecutive(sorted_ids, return_counts=True)[1].tolist())
        self._tile_sizes = frozenset(tile_sizes(head_dim)) if head_dim is not None else frozenset()
        for bm, bn in sorted(self._tile_sizes):
            for name, t in zip(_MAP_NAMES, block_maps(ids, bm, bn)):
                self.register_buffer(f"{name}_{bm}x{bn}", t, persistent=False)

    def tiles(self, block_m: int, block_n: int):
        """(kv_count, kv_idx, q_count, q_idx) at these tile sizes: the cached ones, else built now."""
        if (block_m, block_n) in self._tile_sizes:
            return tuple(getattr(self, f"{name}_{block_m}x{block_n}") for name in _MAP_NAMES)
        return block_maps(self.frame_ids, block_m, block_n)

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, frames={len(self.counts)}, sorted={self.sort_order is None}"


def as_layout(frames) -> FrameLayout:
    """A FrameLayout as is; a frame-id tensor as a layout built now (reads the ids on the host: for eager
    callers such as tests and benchmarks, not for compiled models)."""
    if isinstance(frames, FrameLayout):
        return frames
    return FrameLayout(frames).to(frames.device)
