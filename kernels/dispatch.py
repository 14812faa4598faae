"""Backend choice for every op, and why.

Public entry points (re-exported by `kernels/__init__.py`):

    block_causal_attention(q, k, v, frame_ids, rope=None, scale=None, dropout_p=0.0, backend="auto")
    layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps=1e-5, backend="auto")
    tiled_embedding(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias, backend="auto")

Attention backends (q, k, v: (B, H, N, D); frame_ids: (N,); rope: (cos, sin) (N, D) fp32 or None):

    triton     kernels.attention: RoPE fused, whole masked tiles skipped, dropout in-kernel. CUDA
               tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
    sdpa       per-frame prefix SDPA: one `scaled_dot_product_attention` call per frame, its queries
               against the key prefix of frames <= it, no mask (exact FLOPs). RoPE as a separate
               pass. Tokens not in frame-major order are sorted by frame first and restored after.
               On CPU fp16/bf16 inputs are computed in fp32 (faster there, and more accurate).
               The fastest CPU path (bench/bench_attention.py: beats SDPA with a dense boolean mask
               in forward+backward).
    flex       FlexAttention (compiled) with a BlockMask built from frame ids. On CPU forward only
               (torch 2.13 raises when inputs require grad): refused there; no dropout.
    flash      flash-attn, xformers: imported lazily; neither can express the frame-block-causal
    xformers   mask (other than as a dense bias, which is the slow path), so both are refused.
    reference  kernels.reference.block_causal_attention_ref (explicit scores, fp32 softmax).
    auto       triton on CUDA for fp16/bf16 inputs when triton is installed, else sdpa: fp32 (and fp64)
               attention on CUDA goes to SDPA, because the Triton configurations are compile-checked
               (`python -m kernels.compile_check`, sm_80/sm_90) for fp16/bf16 only, and an unchecked
               kernel variant is never run (an explicit `triton` is refused for fp32 CUDA inputs).

Other ops: `triton` (kernels.ln_linear / kernels.embedding, imported lazily; CUDA or the
interpreter), `reference`, `auto` (triton on CUDA when importable, else reference).

An explicitly requested backend that cannot run the call raises `BackendUnavailable` with the
reason; `auto` never picks one that cannot. Every distinct resolution is logged once (logger
`kernels`, INFO) with its reason; `resolve_attention` / `resolve_simple` return the `Choice`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging

import torch
import torch.nn.functional as F

from . import flops  # noqa: F401  (registers the FLOP formulas of the CPU SDPA path `sdpa` runs)
from . import reference
from .common import interpreting
from .frames import CHECKED_DTYPES, HEAD_DIMS, FrameLayout, as_layout

log = logging.getLogger("kernels")

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "flex", "flash", "xformers", "reference")
SIMPLE_BACKENDS = ("auto", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend an op call resolved to, and why."""

    op: str
    requested: str
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: backend={self.backend} (requested {self.requested}): {self.reason}"


_logged: set[Choice] = set()


def _log_once(choice: Choice) -> Choice:
    if choice not in _logged:
        _logged.add(choice)
        log.info("%s", choice)
    return choice


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> str | None:
    """None if `module` imports, else the reason it does not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{module} not importable ({type(exc).__name__}: {exc})"
    return None


def _triton_blocker(module: str, device_type: str) -> str | None:
    """Why the Triton implementation in `module` cannot run on `device_type` tensors, or None."""
    if device_type != "cuda" and not interpreting():
        return f"Triton needs CUDA tensors (got {device_type}; set TRITON_INTERPRET=1 to interpret on CPU)"
    return _importable("triton") or _importable(module)


# ----------------------------------------------------------------------------------------------
# attention backends in plain PyTorch
# ----------------------------------------------------------------------------------------------
def _frame_ids(frames) -> torch.Tensor:
    return frames.frame_ids if isinstance(frames, FrameLayout) else frames


def _rotate(q, k, rope):
    if rope is None:
        return q, k
    return reference.apply_rope_ref(q, *rope), reference.apply_rope_ref(k, *rope)


def sdpa_dense_attention(q, k, v, frames, rope=None, scale=None, dropout_p=0.0):
    """Baseline: SDPA with the dense (N, N) boolean frame mask (what the official code does)."""
    q, k = _rotate(q, k, rope)
    mask = reference.block_causal_mask(_frame_ids(frames).to(q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def frame_prefix_attention(q, k, v, frames, rope=None, scale=None, dropout_p=0.0):
    """Per-frame prefix SDPA: frame f's queries against the keys of frames <= f, no mask.

    q, k, v: (B, H, N, D); frames: a `FrameLayout` (its Python frame sizes: no host read, traces under
    torch.compile) or frame ids (N,) (read on the host now). Frame ids not in non-decreasing order are
    sorted (stable) and the output is put back in the input order. Dropout: torch's own (the generator
    torch.compile and CUDA graphs already handle: each call and each replay draws anew). On CPU the
    attention is computed in fp32 whatever the input dtype, also under autocast (which would otherwise
    recast the upcast inputs to bf16; the CPU bf16 SDPA backward is also ~2x slower than fp32), and
    returned in the input dtype.
    """
    if q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            return _frame_prefix_attention(q, k, v, as_layout(frames), rope, scale, dropout_p)
    return _frame_prefix_attention(q, k, v, as_layout(frames), rope, scale, dropout_p)


def _frame_prefix_attention(q, k, v, layout: FrameLayout, rope, scale, dropout_p):
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    q, k = _rotate(q, k, rope)
    order = layout.sort_order
    if order is not None:
        q, k, v = q[:, :, order], k[:, :, order], v[:, :, order]
    outs, end = [], 0
    for count in layout.counts:
        start, end = end, end + count
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end],
                                                   dropout_p=dropout_p, scale=scale))  # (B, H, count, D)
    out = torch.cat(outs, dim=2)  # (B, H, N, D), frame-sorted
    if order is not None:
        out = out[:, :, layout.sort_inverse]
    return out.to(dtype)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_FLEX_MASKS: dict = {}


def _flex_block_mask(frame_ids: torch.Tensor, device: torch.device):
    """BlockMask of the frame-block-causal mask, cached per (device, frame ids)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (str(device), tuple(frame_ids.tolist()))
    if key not in _FLEX_MASKS:
        fids = frame_ids.to(device=device, dtype=torch.int32)
        n = fids.numel()

        def frame_causal(b, h, q_idx, kv_idx):
            return fids[kv_idx] <= fids[q_idx]

        if len(_FLEX_MASKS) > 16:
            _FLEX_MASKS.clear()
        _FLEX_MASKS[key] = create_block_mask(frame_causal, None, None, n, n, device=device)
    return _FLEX_MASKS[key]


def flex_block_causal_attention(q, k, v, frames, rope=None, scale=None, dropout_p=0.0):
    """FlexAttention (compiled) with a BlockMask from frame ids. No dropout; forward only on CPU."""
    q, k = _rotate(q, k, rope)
    block_mask = _flex_block_mask(_frame_ids(frames), q.device)
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)


# ----------------------------------------------------------------------------------------------
# attention: choice
# ----------------------------------------------------------------------------------------------
def _attention_blocker(backend: str, device_type: str, head_dim: int, dropout_p: float,
                       needs_grad: bool, dtype: str) -> str | None:
    """Why `backend` cannot run this call, or None. dtype: the inputs' torch dtype name."""
    if backend == "triton":
        blocker = _triton_blocker("kernels.attention", device_type)
        if blocker is None and head_dim > 64:
            blocker = f"head dim {head_dim} > 64 is not supported by the Triton kernel"
        if blocker is None and device_type == "cuda" and head_dim not in HEAD_DIMS:
            blocker = (f"head dim {head_dim}: the Triton kernel is compile-checked for head dims "
                       f"{'/'.join(map(str, HEAD_DIMS))} only (python -m kernels.compile_check), "
                       f"and an unchecked variant is never run")
        if blocker is None and device_type == "cuda" and dtype not in _CHECKED_DTYPE_NAMES:
            blocker = (f"{dtype} inputs: the Triton configurations are compile-checked for sm_80/sm_90 in "
                       f"{'/'.join(_CHECKED_DTYPE_NAMES)} only (python -m kernels.compile_check), "
                       f"and an unchecked variant is never run")
        return blocker
    if backend == "flex":
        if dropout_p > 0.0:
            return "FlexAttention has no attention dropout"
        if device_type == "cpu" and needs_grad:
            return "FlexAttention on CPU is forward only in torch 2.13 (inputs require grad)"
        return _importable("torch.nn.attention.flex_attention")
    if backend in ("flash", "xformers"):
        module = "flash_attn" if backend == "flash" else "xformers.ops"
        missing = _importable(module)
        if missing:
            return missing
        return (f"{backend} cannot express the frame-block-causal mask (only full, causal or "
                f"block-diagonal masks); use triton, sdpa or flex")
    return None  # sdpa, reference: always


def resolve_attention(backend: str, q: torch.Tensor, dropout_p: float = 0.0, needs_grad: bool = False) -> Choice:
    """The backend `block_causal_attention` runs for these inputs, and why (logged once)."""
    return _resolve_attention(backend, q.device.type, q.shape[-1], dropout_p, needs_grad, _dtype_name(q.dtype))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_CHECKED_DTYPE_NAMES = tuple(_dtype_name(d) for d in CHECKED_DTYPES)


def _resolve_attention(backend: str, device_type: str, head_dim: int, dropout_p: float, needs_grad: bool,
                       dtype: str) -> Choice:
    """The pure decision (device type and dtype as strings, so it is unit-tested without a GPU)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose one of {ATTENTION_BACKENDS}")
    if backend != "auto":
        blocker = _attention_blocker(backend, device_type, head_dim, dropout_p, needs_grad, dtype)
        if blocker:
            raise BackendUnavailable(f"block_causal_attention: backend {backend!r} refused: {blocker}")
        return _log_once(Choice("block_causal_attention", backend, backend, "requested explicitly"))
    if device_type == "cuda":
        blocker = _attention_blocker("triton", device_type, head_dim, dropout_p, needs_grad, dtype)
        if blocker is None:
            return _log_once(Choice("block_causal_attention", "auto", "triton",
                                    f"CUDA {dtype} tensors and triton installed: a compile-checked configuration, "
                                    f"fused RoPE, masked tiles skipped"))
        return _log_once(Choice("block_causal_attention", "auto", "sdpa", f"triton unavailable: {blocker}"))
    return _log_once(Choice("block_causal_attention", "auto", "sdpa",
                            f"{device_type} tensors: per-frame prefix SDPA is the fastest measured CPU path"))


# torch.compile runs these at trace time and sees only the resulting backend name, so a model that
# calls the public ops traces with fullgraph=True (resolution imports modules and logs).
@torch.compiler.assume_constant_result
def _attention_backend(backend: str, device_type: str, head_dim: int, dropout_p: float, needs_grad: bool,
                       dtype: str) -> str:
    return _resolve_attention(backend, device_type, head_dim, dropout_p, needs_grad, dtype).backend


@torch.compiler.assume_constant_result
def _simple_backend(op: str, module: str, backend: str, device_type: str) -> str:
    return _resolve_simple(op, module, backend, device_type).backend


def attention_backend_for(backend: str, device_type: str, head_dim: int, dtype: torch.dtype) -> str:
    """The backend name `block_causal_attention` resolves to without dropout for inputs of `dtype` (models
    pick a token layout by it; see `attention_dtype`)."""
    return _attention_backend(backend, device_type, head_dim, 0.0, False, _dtype_name(dtype))


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q, k, v computed from x will have: autocast's when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def block_causal_attention(q, k, v, frames, rope=None, scale=None, dropout_p=0.0, backend="auto", seed=None):
    """Frame-block-causal attention. q, k, v: (B, H, N, D) -> (B, H, N, D).

    frames: the `kernels.frames.FrameLayout` of the sequence (what models pass: built once per token
    layout, so the call traces under torch.compile with fullgraph=True), or its frame ids (N,) int
    (derived per call, with host reads: eager callers). seed: the (1,) int64 device tensor the Triton
    kernel draws its dropout mask from (`kernels.dropout.DropoutSeed`); the other backends use torch's
    generator."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = _attention_backend(backend, q.device.type, q.shape[-1], float(dropout_p), needs_grad, _dtype_name(q.dtype))
    if name == "triton":
        from .attention import block_causal_attention_triton

        return block_causal_attention_triton(q, k, v, frames, rope, scale, dropout_p, seed=seed)
    if name == "sdpa":
        return frame_prefix_attention(q, k, v, frames, rope, scale, dropout_p)
    if name == "flex":
        return flex_block_causal_attention(q, k, v, frames, rope, scale, dropout_p)
    return reference.block_causal_attention_ref(q, k, v, _frame_ids(frames), rope, scale, dropout_p)


# ----------------------------------------------------------------------------------------------
# LayerNorm -> Linear, tiled embedding
# ----------------------------------------------------------------------------------------------
def resolve_simple(op: str, module: str, backend: str, device: torch.device) -> Choice:
    """Backend for an op with `triton` and `reference` implementations, and why (logged once)."""
    return _resolve_simple(op, module, backend, device.type)


def _resolve_simple(op: str, module: str, backend: str, device_type: str) -> Choice:
    if backend not in SIMPLE_BACKENDS:
        raise ValueError(f"{op} backend {backend!r} unknown; choose one of {SIMPLE_BACKENDS}")
    if backend == "reference":
        return _log_once(Choice(op, backend, "reference", "requested explicitly"))
    blocker = _triton_blocker(module, device_type)
    if backend == "triton":
        if blocker:
            raise BackendUnavailable(f"{op}: backend 'triton' refused: {blocker}")
        return _log_once(Choice(op, backend, "triton", "requested explicitly"))
    if device_type == "cuda" and blocker is None:
        return _log_once(Choice(op, "auto", "triton", "CUDA tensors and triton installed"))
    return _log_once(Choice(op, "auto", "reference", blocker if device_type == "cuda" else
                            f"{device_type} tensors: the PyTorch reference"))


def layernorm_linear(x, ln_weight, ln_bias, weight, bias, eps=1e-5, backend="auto"):
    """Linear(LayerNorm(x)). x: (..., K), weight: (M, K) -> (..., M)."""
    if _simple_backend("layernorm_linear", "kernels.ln_linear", backend, x.device.type) == "triton":
        from .ln_linear import layernorm_linear_triton

        return layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, eps)
    return reference.layernorm_linear_ref(x, ln_weight, ln_bias, weight, bias, eps)


def tiled_embedding(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias, backend="auto"):
    """[visual | proprio_emb | action_emb] over patches: (B, T, P, Dv + Ep + Ea)."""
    if _simple_backend("tiled_embedding", "kernels.embedding", backend, visual.device.type) == "triton":
        from .embedding import tiled_embedding_triton

        return tiled_embedding_triton(visual, proprio, action, proprio_weight, proprio_bias, action_weight,
                                      action_bias)
    return reference.tiled_embedding_ref(visual, proprio, action, proprio_weight, proprio_bias,
                                         action_weight, action_bias)
