"""Backend choice for every op, and why.

Public entry points (re-exported by `kernels/__init__.py`):

    block_causal_attention(q, k, v, frame_ids, rope=None, scale=None, dropout_p=0.0, backend="auto")
    layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps=1e-5, backend="auto")
    tiled_embedding(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias, backend="auto")

Attention backends: triton, sdpa, flex, flash, xformers, reference. Other ops: triton, reference.
`auto` resolves per call site from the device and what is installed; every resolution is logged
once with its reason. A backend that cannot express the frame-block-causal mask is refused.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from . import reference

log = logging.getLogger("kernels")

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "flex", "flash", "xformers", "reference")
SIMPLE_BACKENDS = ("auto", "triton", "reference")


def _sdpa_attention(q, k, v, frame_ids, rope, scale, dropout_p):
    if rope is not None:
        q = reference.apply_rope_ref(q, *rope)
        k = reference.apply_rope_ref(k, *rope)
    mask = reference.block_causal_mask(frame_ids.to(q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def block_causal_attention(q, k, v, frame_ids, rope=None, scale=None, dropout_p=0.0, backend="auto"):
    """Frame-block-causal attention. q, k, v: (B, H, N, D); frame_ids: (N,) int32 -> (B, H, N, D)."""
    if backend in ("auto", "sdpa"):
        return _sdpa_attention(q, k, v, frame_ids, rope, scale, dropout_p)
    if backend == "reference":
        return reference.block_causal_attention_ref(q, k, v, frame_ids, rope, scale, dropout_p)
    raise ValueError(f"attention backend {backend!r} is not available yet; choose one of {ATTENTION_BACKENDS}")


def layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps=1e-5, backend="auto"):
    """Linear(LayerNorm(x)). x: (..., K), weight: (M, K) -> (..., M)."""
    if backend in ("auto", "reference"):
        return reference.layernorm_linear_ref(x, ln_weight, ln_bias, weight, bias, eps)
    raise ValueError(f"layernorm_linear backend {backend!r} is not available yet; choose one of {SIMPLE_BACKENDS}")


def tiled_embedding(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias, backend="auto"):
    """[visual | proprio_emb | action_emb] over patches: (B, T, P, Dv + Ep + Ea)."""
    if backend in ("auto", "reference"):
        return reference.tiled_embedding_ref(visual, proprio, action, proprio_weight, proprio_bias,
                                             action_weight, action_bias)
    raise ValueError(f"tiled_embedding backend {backend!r} is not available yet; choose one of {SIMPLE_BACKENDS}")
