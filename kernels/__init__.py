"""Kernels for DINO world models: the public functional API only.

Each op dispatches to a backend (`triton`, `reference`, and for attention also `sdpa`, `flex`,
`flash`, `xformers`); see `kernels.dispatch`. Pure-PyTorch specifications live in
`kernels.reference`; Triton implementations in one file per op (`attention.py`, `ln_linear.py`,
`embedding.py`).
"""
from .dispatch import BackendUnavailable, block_causal_attention, layernorm_linear, tiled_embedding
from .reference import ac_token_positions, cond_last_order, frame_ids_for, rope_tables

__all__ = [
    "block_causal_attention",
    "layernorm_linear",
    "tiled_embedding",
    "BackendUnavailable",
    "frame_ids_for",
    "rope_tables",
    "ac_token_positions",
    "cond_last_order",
]
