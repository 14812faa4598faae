"""FLOP formulas for torch.utils.flop_counter.FlopCounterMode (used by dinowm.metrics.count_step_flops).

`register_flops` registers a formula for an op; the formulas of our custom ops are plain functions
of the op's arguments, registered by the kernel module that defines the op. Importing this module
also registers formulas for aten's CPU flash SDPA ops (the `sdpa` attention backend on CPU), which
torch 2.13's FlopCounterMode lacks. Imports no triton and no kernel module.

Counts (forward; a backward formula follows each):
    block_causal_attention   4 * B * H * D * allowed  (QK^T and PV over allowed score entries only)
                             backward 2.5x (QK^T recomputed, dV, dP, dQ, dK)
    layernorm_linear         2 * M * K * N (the LayerNorm's O(M * K) is not counted); backward 2x (dx, dW)
    tiled_embedding          2 * B * T * (Ep * Dp + Ea * Da) (once per frame, not per patch); backward
                             the same for d proprio / d action (dW GEMMs run as aten.mm, counted there)
    CPU flash SDPA           2 * B * H * Nq * Nk * (Dqk + Dv); backward 2.5x
"""
from __future__ import annotations

import torch


def register_flops(op, get_raw: bool = True):
    """Decorator: register `fn` as the FlopCounterMode formula of `op` (an OpOverloadPacket), once.

    FlopCounterMode copies the registry when it is created, and the Triton modules are imported lazily,
    typically during the very step being counted: the formula is also added to the counters running now.
    """
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    def wrap(fn):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=get_raw)(fn)
        formula = flop_counter.flop_registry[op]
        for mode in _get_current_dispatch_mode_stack():
            counter = getattr(mode, "counter", None)
            if isinstance(counter, flop_counter.FlopCounterMode):
                counter.flop_registry.setdefault(op, formula)
        return fn

    return wrap


# ----------------------------------------------------------------------------------------------
# block-causal attention (kernels.attention)
# ----------------------------------------------------------------------------------------------
def allowed_pairs(frame_ids: torch.Tensor) -> int:
    """Number of (i, j) with frame(j) <= frame(i), from the per-frame token counts c_f (no (N, N) tensor):
    sum_f c_f * (c_0 + ... + c_f). Without values (fake or meta frame_ids, under tracing) the dense N * N."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(frame_ids, (FakeTensor, FunctionalTensor)) or frame_ids.device.type == "meta":
        return frame_ids.numel() ** 2
    counts = torch.unique(frame_ids, return_counts=True)[1].to(torch.int64)  # (F,) in frame order
    return int((counts * counts.cumsum(0)).sum())


def _attention_flops(q, frame_ids) -> int:
    b, h, _n, d = q.shape  # (B, H, N, D)
    return 4 * b * h * d * allowed_pairs(frame_ids)


def block_causal_attention_flops(q, k, v, frame_ids, *args, out_val=None, **kwargs) -> int:
    return _attention_flops(q, frame_ids)


def block_causal_attention_bwd_flops(do, q, k, v, out, lse, frame_ids, *args, out_val=None, **kwargs) -> int:
    return 5 * _attention_flops(q, frame_ids) // 2


# ----------------------------------------------------------------------------------------------
# LayerNorm -> Linear (kernels.ln_linear)
# ----------------------------------------------------------------------------------------------
def _gemm_flops(x, weight) -> int:
    """2 * M * K * N for x (..., K) and weight (N, K)."""
    k = x.shape[-1]
    return 2 * (x.numel() // k) * k * weight.shape[0]


def layernorm_linear_flops(x, ln_weight, ln_bias, weight, *args, out_val=None, **kwargs) -> int:
    return _gemm_flops(x, weight)


def layernorm_linear_backward_flops(dy, x, ln_weight, ln_bias, weight, *args, out_val=None, **kwargs) -> int:
    return 2 * _gemm_flops(x, weight)  # dxt = dy @ W and dW = dy^T @ xt


# ----------------------------------------------------------------------------------------------
# tiled embedding (kernels.embedding)
# ----------------------------------------------------------------------------------------------
def _small_gemm_flops(proprio, action, proprio_weight, action_weight) -> int:
    frames = proprio.numel() // proprio.shape[-1]
    return 2 * frames * (proprio_weight.numel() + action_weight.numel())


def tiled_embedding_flops(visual, proprio, action, proprio_weight, proprio_bias, action_weight, *args,
                          out_val=None, **kwargs) -> int:
    return _small_gemm_flops(proprio, action, proprio_weight, action_weight)


def tiled_embedding_backward_flops(grad, proprio, action, proprio_weight, action_weight, *args, out_val=None,
                                   **kwargs) -> int:
    return _small_gemm_flops(proprio, action, proprio_weight, action_weight)


# ----------------------------------------------------------------------------------------------
# aten's CPU flash SDPA (the `sdpa` backend on CPU)
# ----------------------------------------------------------------------------------------------
def _register_cpu_sdpa_flops() -> None:
    """Shape-based, like torch's own SDPA formulas (no causal discount)."""
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

    def fwd_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, nq, d = query_shape  # (B, H, Nq, D)
        return 2 * b * h * nq * key_shape[-2] * (d + value_shape[-1])

    def bwd_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 5 * fwd_flops(query_shape, key_shape, value_shape) // 2

    if fwd is not None:
        register_flops(fwd, get_raw=False)(fwd_flops)
    if bwd is not None:
        register_flops(bwd, get_raw=False)(bwd_flops)


_register_cpu_sdpa_flops()
