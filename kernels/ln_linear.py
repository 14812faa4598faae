"""Fused LayerNorm -> Linear: y = (LN(x) * gamma + beta) @ W^T + b, forward and backward in Triton.

Shapes: x: (..., K) flattened to (M, K) rows; gamma, beta: (K,) or None; W: (N, K); b: (N,) or None;
y: (..., N). (`kernels.reference.layernorm_linear_ref` is the spec; it names W's shape (M, K).)

Forward (one kernel, programs tile M rows x N outputs, grouped order for L2 reuse):

    prologue   mean, rstd of the program's BLOCK_M rows in one pass over K (Chan's merge of per-chunk
               mean / M2, fp32), stored once (by the pid_n == 0 programs) for the backward
    main loop  for each BLOCK_K chunk: load x, xhat = (x - mean) * rstd, xt = xhat * gamma + beta,
               acc += dot(xt, W^T) with xt cast to the dot dtype (W's dtype) right before the dot
    epilogue   y = acc + b

The normalised activations xt never touch memory: that is where the win over F.layer_norm +
F.linear comes from (the LN output is as large as x and would be written and read back).

Backward, with g = dy (M, N), xhat recomputed from x, mean, rstd and dxt = g @ W (M, K):

    dW     = g^T @ xt                                   (N, K)  recompute xt in the prologue
    db     = sum_m g                                    (N,)
    dgamma = sum_m dxt * xhat,   dbeta = sum_m dxt      (K,)
    dx     = rstd * (h - mean_k(h) - xhat * mean_k(h * xhat)),   h = dxt * gamma

Kernels: `_layernorm_linear_bwd_dx_kernel` (programs own BLOCK_M full rows: sweep 1 computes dxt
one K chunk at a time, writes h into dx, accumulates the row sums of h and h * xhat in fp32 and the
per-program dgamma/dbeta partials (fp32, (num_m_programs, K)); sweep 2 reads h back and finishes dx);
`_layernorm_linear_bwd_dw_kernel` (programs tile N x K, loop over M, also db);
`_layernorm_linear_bwd_dln_kernel` (sums the partials in a fixed order: deterministic, no atomics).

Numerics: mean, rstd and all partials in fp32 (fp64 for fp64 inputs, which serve gradcheck);
accumulation in fp32; dot inputs in W's dtype (fp32 dots use IEEE precision, not tf32), except bf16
under TRITON_INTERPRET=1, whose bf16 arithmetic is broken (triton issue 11584): there the dots run
in fp32. All loads are upcast right away, so no bf16 arithmetic ever happens.
Mixed precision (autocast): x, gamma, beta may be fp32 while W, b are fp16/bf16. The statistics and xt
are then computed in fp32 from the fp32 x, and xt is rounded to W's dtype only as the dot input, as
`F.linear(F.layer_norm(x))` does under autocast. y, dW, db come out in W's dtype; dx in x's dtype;
dgamma, dbeta (fp32-accumulated) in their parameters' dtype; dy is cast to W's dtype for the dots.
Limits: x, W contiguous in the last dimension (the launcher copies otherwise); dtypes as checked by
`_check_inputs`; one device; dx is returned in x's dtype (h is held in dx's dtype between the sweeps).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import dot_dtype, tl_dtypes
from .flops import layernorm_linear_backward_flops, layernorm_linear_flops, register_flops

# One fixed configuration per kernel and input precision (autotune with several configs fails without
# a GPU driver). fp16/bf16 dots run on tensor cores (wgmma on sm_90); fp32 dots are IEEE FMA loops
# and need smaller tiles to stay spill-free. fp64 (gradcheck under the interpreter) uses "fp32".
# Tiles are chosen spill-free both for row strides that are multiples of 16 elements (K = 384) and for
# those that are not (K = 404: rows are not 16-byte aligned, loads cannot be vectorised and every
# element needs its own address register) -- see `compile_specs` and kernels.compile_check.
# "mixed" (autocast: fp32 x with an fp16/bf16 weight) is "lowp" except where the fp32 x / dx tiles need
# smaller tiles (bwd_dx at K = 404 spilled on sm_80 with BLOCK_K=64).
CONFIGS = {
    "fwd": {"lowp": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
            "fp32": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3)},
    "bwd_dx": {"lowp": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3),
               "mixed": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3),
               "fp32": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=3)},
    "bwd_dw": {"lowp": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
               "fp32": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)},
    "bwd_dln": {"lowp": dict(BLOCK_K=128, num_warps=4, num_stages=1),
                "fp32": dict(BLOCK_K=128, num_warps=4, num_stages=1)},
}


def _precision(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> str:
    if weight_dtype not in (torch.float16, torch.bfloat16):
        return "fp32"
    return "mixed" if x_dtype == torch.float32 else "lowp"


def _config(kernel: str, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> dict:
    configs = CONFIGS[kernel]
    precision = _precision(x_dtype, weight_dtype)
    return configs.get(precision, configs["lowp" if precision == "mixed" else precision])


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _layernorm_linear_fwd_kernel(
    # pointers
    X,  # (M, K)
    LnW,  # (K,) gamma, or a dummy
    LnB,  # (K,) beta, or a dummy
    W,  # (N, K)
    B,  # (N,) or a dummy
    Y,  # (M, N)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    # strides
    stride_x_m,
    stride_w_n,
    stride_y_m,
    # sizes
    M,
    N,
    K,
    eps,
    # meta-parameters
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped program order: GROUP_M row blocks share the W tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    offs_k = tl.arange(0, BLOCK_K)

    # -- row statistics: one pass, Chan's merge of per-chunk mean and M2 --
    mean = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(X + rows[:, None] * stride_x_m + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(ACC_DTYPE)
        n_a = tl.cast(k0, ACC_DTYPE)
        n_c = tl.cast(tl.minimum(K - k0, BLOCK_K), ACC_DTYPE)
        c_mean = tl.sum(x, axis=1) / n_c
        d = tl.where(k_mask[None, :], x - c_mean[:, None], 0.0)
        delta = c_mean - mean
        mean += delta * (n_c / (n_a + n_c))
        m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_c / (n_a + n_c))
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    if pid_n == 0:
        tl.store(Mean + rows, mean, mask=row_mask)
        tl.store(Rstd + rows, rstd, mask=row_mask)

    # -- GEMM with the normalisation in the prologue --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        x = tl.load(X + rows[:, None] * stride_x_m + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0).to(ACC_DTYPE)
        xt = (x - mean[:, None]) * rstd[:, None]
        if HAS_LN_WEIGHT:
            xt = xt * tl.load(LnW + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)[None, :]
        if HAS_LN_BIAS:
            xt = xt + tl.load(LnB + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)[None, :]
        w = tl.load(W + cols[None, :] * stride_w_n + ks[:, None],  # (BLOCK_K, BLOCK_N) = W^T tile
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                     out_dtype=ACC_DTYPE)

    # -- epilogue --
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(Y + rows[:, None] * stride_y_m + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _layernorm_linear_bwd_dx_kernel(
    # pointers
    DY,  # (M, N)
    X,  # (M, K)
    LnW,  # (K,) or a dummy
    LnB,  # (K,) or a dummy
    W,  # (N, K)
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DX,  # (M, K) out; holds h = dxt * gamma between the two sweeps
    DLnWPartial,  # (cdiv(M, BLOCK_M), K) fp32 out, or a dummy
    DLnBPartial,  # (cdiv(M, BLOCK_M), K) fp32 out, or a dummy
    # strides
    stride_dy_m,
    stride_x_m,
    stride_w_n,
    stride_dx_m,
    stride_p_m,
    # sizes
    M,
    N,
    K,
    # meta-parameters
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mean = tl.load(Mean + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)

    # -- sweep 1: dxt = dy @ W chunk by chunk; h into DX, row sums, dgamma/dbeta partials --
    sum_h = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    sum_hx = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < K
        tile_mask = row_mask[:, None] & k_mask[None, :]
        dxt = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + offs_n
            n_mask = ns < N
            dy = tl.load(DY + rows[:, None] * stride_dy_m + ns[None, :],
                         mask=row_mask[:, None] & n_mask[None, :], other=0.0)
            w = tl.load(W + ns[:, None] * stride_w_n + ks[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
            dxt = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), dxt, input_precision=INPUT_PRECISION,
                         out_dtype=ACC_DTYPE)
        x = tl.load(X + rows[:, None] * stride_x_m + ks[None, :], mask=tile_mask, other=0.0).to(ACC_DTYPE)
        xhat = (x - mean[:, None]) * rstd[:, None]
        if HAS_LN_WEIGHT:
            h = dxt * tl.load(LnW + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)[None, :]
            p_off = pid_m.to(tl.int64) * stride_p_m + ks
            tl.store(DLnWPartial + p_off, tl.sum(dxt * xhat, axis=0), mask=k_mask)
        else:
            h = dxt
        if HAS_LN_BIAS:
            tl.store(DLnBPartial + pid_m.to(tl.int64) * stride_p_m + ks, tl.sum(dxt, axis=0), mask=k_mask)
        sum_h += tl.sum(h, axis=1)
        sum_hx += tl.sum(tl.where(k_mask[None, :], h * xhat, 0.0), axis=1)
        tl.store(DX + rows[:, None] * stride_dx_m + ks[None, :], h.to(DX.dtype.element_ty), mask=tile_mask)

    # h was stored by other threads of this program: make it visible before reading it back
    tl.debug_barrier()

    # -- sweep 2: dx = rstd * (h - mean_k(h) - xhat * mean_k(h * xhat)) --
    c1 = sum_h / K
    c2 = sum_hx / K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        tile_mask = row_mask[:, None] & (ks < K)[None, :]
        x = tl.load(X + rows[:, None] * stride_x_m + ks[None, :], mask=tile_mask, other=0.0).to(ACC_DTYPE)
        xhat = (x - mean[:, None]) * rstd[:, None]
        h = tl.load(DX + rows[:, None] * stride_dx_m + ks[None, :], mask=tile_mask, other=0.0).to(ACC_DTYPE)
        dx = rstd[:, None] * (h - c1[:, None] - xhat * c2[:, None])
        tl.store(DX + rows[:, None] * stride_dx_m + ks[None, :], dx.to(DX.dtype.element_ty), mask=tile_mask)


@triton.jit
def _layernorm_linear_bwd_dw_kernel(
    # pointers
    DY,  # (M, N)
    X,  # (M, K)
    LnW,  # (K,) or a dummy
    LnB,  # (K,) or a dummy
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DW,  # (N, K) out
    DB,  # (N,) out, or a dummy
    # strides
    stride_dy_m,
    stride_x_m,
    stride_dw_n,
    # sizes
    M,
    N,
    K,
    # meta-parameters
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < N
    k_mask = ks < K
    offs_m = tl.arange(0, BLOCK_M)
    if HAS_LN_WEIGHT:
        gamma = tl.load(LnW + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)
    if HAS_LN_BIAS:
        beta = tl.load(LnB + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    db = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(0, M, BLOCK_M):
        rows = (m0 + offs_m).to(tl.int64)
        row_mask = rows < M
        # -- recompute the LN output tile xt (BLOCK_M, BLOCK_K) --
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        x = tl.load(X + rows[:, None] * stride_x_m + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC_DTYPE)
        xt = (x - mean[:, None]) * rstd[:, None]
        if HAS_LN_WEIGHT:
            xt = xt * gamma[None, :]
        if HAS_LN_BIAS:
            xt = xt + beta[None, :]
        xt = tl.where(row_mask[:, None], xt, 0.0)
        # -- dW tile += dy^T @ xt --
        dy = tl.load(DY + rows[:, None] * stride_dy_m + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                     other=0.0)
        acc = tl.dot(tl.trans(dy.to(DOT_DTYPE)), xt.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION,
                     out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            db += tl.sum(dy.to(ACC_DTYPE), axis=0)

    tl.store(DW + cols[:, None] * stride_dw_n + ks[None, :], acc.to(DW.dtype.element_ty),
             mask=col_mask[:, None] & k_mask[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_mask)


@triton.jit
def _layernorm_linear_bwd_dln_kernel(
    # pointers
    DLnWPartial,  # (P, K) fp32, or a dummy
    DLnBPartial,  # (P, K) fp32, or a dummy
    DLnW,  # (K,) out, or a dummy
    DLnB,  # (K,) out, or a dummy
    # strides
    stride_p_m,
    # sizes
    P,
    K,
    # meta-parameters
    HAS_LN_WEIGHT: tl.constexpr,
    HAS_LN_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # fixed summation order over the P partial rows: bitwise reproducible
    ks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    dgamma = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    dbeta = tl.zeros((BLOCK_K,), dtype=ACC_DTYPE)
    for p in range(0, P):
        if HAS_LN_WEIGHT:
            dgamma += tl.load(DLnWPartial + p * stride_p_m + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)
        if HAS_LN_BIAS:
            dbeta += tl.load(DLnBPartial + p * stride_p_m + ks, mask=k_mask, other=0.0).to(ACC_DTYPE)
    if HAS_LN_WEIGHT:
        tl.store(DLnW + ks, dgamma.to(DLnW.dtype.element_ty), mask=k_mask)
    if HAS_LN_BIAS:
        tl.store(DLnB + ks, dbeta.to(DLnB.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _numerics(weight_dtype: torch.dtype) -> dict:
    """ACC_DTYPE, DOT_DTYPE, INPUT_PRECISION from the weight's dtype (the GEMM dtype; x is fp32 or the same
    dtype, see `_check_inputs`); the stats dtype is ACC_DTYPE."""
    dtype = weight_dtype
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    dot = dot_dtype(dtype)
    return dict(ACC_DTYPE=acc, DOT_DTYPE=dot, INPUT_PRECISION="ieee")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_LOWP = (torch.float16, torch.bfloat16)


def _check_inputs(x, ln_weight, ln_bias, weight, bias):
    """Same-dtype inputs, or the autocast mix: weight/bias fp16 or bf16 with x fp32 (or x in the weight's
    dtype) and ln_weight/ln_bias in x's dtype or fp32 -- the LayerNorm runs in fp32 from the inputs as
    given and only its output is rounded to the weight's dtype for the GEMM."""
    if x.dtype not in tl_dtypes():
        raise TypeError(f"layernorm_linear: x dtype {x.dtype} not supported; use one of {list(tl_dtypes())}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layernorm_linear: x must be (..., K) with K > 0, got {tuple(x.shape)}")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"layernorm_linear: weight must be (N, {k}) for x (..., {k}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype and not (weight.dtype in _LOWP and x.dtype == torch.float32):
        raise TypeError(f"layernorm_linear: weight dtype {weight.dtype} differs from x dtype {x.dtype}; mixed "
                        f"precision takes fp32 x with an fp16/bf16 weight only")
    named = {"ln_weight": (ln_weight, (k,)), "ln_bias": (ln_bias, (k,)), "weight": (weight, None),
             "bias": (bias, (weight.shape[0],))}
    for name, (t, shape) in named.items():
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"layernorm_linear: {name} must have shape {shape}, got {tuple(t.shape)}")
        if name == "bias" and t.dtype != weight.dtype:
            raise TypeError(f"layernorm_linear: bias dtype {t.dtype} differs from weight dtype {weight.dtype}")
        if name.startswith("ln_") and t.dtype != x.dtype and not (t.dtype == torch.float32 and x.dtype in _LOWP):
            raise TypeError(f"layernorm_linear: {name} dtype {t.dtype} differs from x dtype {x.dtype}; only fp32 "
                            f"LayerNorm parameters may go with an fp16/bf16 x")
        if t.device != x.device:
            raise ValueError(f"layernorm_linear: {name} on {t.device}, x on {x.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K) with unit stride along K (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def layernorm_linear_fwd(x, ln_weight, ln_bias, weight, bias, eps):
    """x: (..., K) -> y (..., N), mean (M,) fp32, rstd (M,) fp32."""
    _check_inputs(x, ln_weight, ln_bias, weight, bias)
    x2 = _rows(x)  # (M, K)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()  # (N, K)
    m, k = x2.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=weight.dtype, device=x.device)  # (M, N) in the GEMM dtype
    mean = torch.empty(m, dtype=_stats_dtype(x.dtype), device=x.device)
    rstd = torch.empty_like(mean)
    if m > 0 and n > 0:
        cfg = _config("fwd", x.dtype, weight.dtype)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _layernorm_linear_fwd_kernel[grid](
            x2, x2 if ln_weight is None else ln_weight, x2 if ln_bias is None else ln_bias, w,
            w if bias is None else bias, y, mean, rstd,
            x2.stride(0), w.stride(0), y.stride(0),
            m, n, k, eps,
            HAS_LN_WEIGHT=ln_weight is not None, HAS_LN_BIAS=ln_bias is not None, HAS_BIAS=bias is not None,
            **_numerics(weight.dtype), **cfg,
        )
    return y.reshape(*x.shape[:-1], n), mean, rstd


def layernorm_linear_bwd(dy, x, ln_weight, ln_bias, weight, bias, mean, rstd):
    """Gradients (dx, dgamma, dbeta, dW, db); None where the input is None. dy: (..., N)."""
    x2 = _rows(x)  # (M, K)
    dy2 = _rows(dy.to(weight.dtype))  # (M, N) in the GEMM dtype
    w = weight if weight.stride(-1) == 1 else weight.contiguous()  # (N, K)
    m, k = x2.shape
    n = w.shape[0]
    if tuple(dy2.shape) != (m, n):
        raise ValueError(f"layernorm_linear: grad_output must be (..., {n}) matching x, got {tuple(dy.shape)}")
    has_w, has_b, has_bias = ln_weight is not None, ln_bias is not None, bias is not None
    num = _numerics(weight.dtype)

    dx = torch.empty_like(x2)  # (M, K)
    dw = torch.empty_like(w)  # (N, K)
    db = torch.empty_like(bias) if has_bias else None  # (N,)
    dgamma = torch.empty_like(ln_weight) if has_w else None  # (K,)
    dbeta = torch.empty_like(ln_bias) if has_b else None  # (K,)
    if m == 0 or n == 0:  # nothing flows back
        for t in (dx, dw, db, dgamma, dbeta):
            if t is not None:
                t.zero_()
        return dx.reshape(x.shape), dgamma, dbeta, dw, db

    cfg = _config("bwd_dx", x.dtype, weight.dtype)
    num_p = triton.cdiv(m, cfg["BLOCK_M"])
    # per-program dgamma / dbeta partials (num_p, K) in fp32; `mean` stands in when not needed
    dgamma_p = torch.empty(num_p, k, dtype=mean.dtype, device=x.device) if has_w else mean
    dbeta_p = torch.empty(num_p, k, dtype=mean.dtype, device=x.device) if has_b else mean
    _layernorm_linear_bwd_dx_kernel[(num_p,)](
        dy2, x2, x2 if not has_w else ln_weight, x2 if not has_b else ln_bias, w, mean, rstd, dx,
        dgamma_p, dbeta_p,
        dy2.stride(0), x2.stride(0), w.stride(0), dx.stride(0), k,
        m, n, k,
        HAS_LN_WEIGHT=has_w, HAS_LN_BIAS=has_b, **num, **cfg,
    )

    cfg = _config("bwd_dw", x.dtype, weight.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _layernorm_linear_bwd_dw_kernel[grid](
        dy2, x2, x2 if not has_w else ln_weight, x2 if not has_b else ln_bias, mean, rstd, dw,
        dw if not has_bias else db,
        dy2.stride(0), x2.stride(0), dw.stride(0),
        m, n, k,
        HAS_LN_WEIGHT=has_w, HAS_LN_BIAS=has_b, HAS_BIAS=has_bias, **num, **cfg,
    )

    if has_w or has_b:
        cfg = _config("bwd_dln", x.dtype, weight.dtype)
        _layernorm_linear_bwd_dln_kernel[(triton.cdiv(k, cfg["BLOCK_K"]),)](
            dgamma_p, dbeta_p, dgamma if has_w else dw, dbeta if has_b else dw,
            k, num_p, k,
            HAS_LN_WEIGHT=has_w, HAS_LN_BIAS=has_b, ACC_DTYPE=num["ACC_DTYPE"], **cfg,
        )
    return dx.reshape(x.shape), dgamma, dbeta, dw, db


# ----------------------------------------------------------------------------------------------
# custom op + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("dinowm::layernorm_linear", mutates_args=())
def _layernorm_linear_op(x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                         weight: torch.Tensor, bias: Optional[torch.Tensor],
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_linear_fwd(x, ln_weight, ln_bias, weight, bias, eps)


@_layernorm_linear_op.register_fake
def _(x, ln_weight, ln_bias, weight, bias, eps):
    m = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype)
    stats = x.new_empty(m, dtype=_stats_dtype(x.dtype))
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("dinowm::layernorm_linear_backward", mutates_args=())
def _layernorm_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
    weight: torch.Tensor, bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
) -> list[torch.Tensor]:
    """[dx, dW] followed by dgamma, dbeta, db for those of ln_weight, ln_bias, bias that are given."""
    dx, dgamma, dbeta, dw, db = layernorm_linear_bwd(dy, x, ln_weight, ln_bias, weight, bias, mean, rstd)
    return [dx, dw] + [g for g in (dgamma, dbeta, db) if g is not None]


@_layernorm_linear_backward_op.register_fake
def _(dy, x, ln_weight, ln_bias, weight, bias, mean, rstd):
    return [torch.empty_like(x), torch.empty_like(weight)] + [
        torch.empty_like(t) for t in (ln_weight, ln_bias, bias) if t is not None]


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, ln_weight, ln_bias, weight, bias, mean, rstd = ctx.saved_tensors
    grads = iter(_layernorm_linear_backward_op(dy, x, ln_weight, ln_bias, weight, bias, mean, rstd))
    dx, dw = next(grads), next(grads)
    dgamma, dbeta, db = (None if t is None else next(grads) for t in (ln_weight, ln_bias, bias))
    return dx, dgamma, dbeta, dw, db, None


_layernorm_linear_op.register_autograd(_backward, setup_context=_setup_context)


def layernorm_linear_triton(x, ln_weight, ln_bias, weight, bias, eps=1e-5):
    """Linear(LayerNorm(x)) in Triton. x: (..., K); ln_weight/ln_bias: (K,) or None; weight: (N, K);
    bias: (N,) or None -> (..., N).

    Under torch.autocast this follows `F.linear(F.layer_norm(x))` under autocast: the LayerNorm runs in fp32
    from x as given (its parameters cast to fp32) and only the normalised activations are rounded to the
    autocast dtype, inside the kernel right before the GEMM; weight and bias are cast to the autocast
    dtype and y comes out in it. Casting x first would lose the rows' fine structure to bf16 rounding of
    x itself when |mean| >> std.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype not in (torch.float32, dtype):
            x = x.float()  # e.g. an fp16 x under bf16 autocast: autocast's layer_norm would upcast it too
        ln_weight, ln_bias = (None if t is None else t.float() for t in (ln_weight, ln_bias))
        weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    return _layernorm_linear_op(x, ln_weight, ln_bias, weight, bias, float(eps))[0]


# FLOP formulas: kernels.flops
register_flops(torch.ops.dinowm.layernorm_linear)(layernorm_linear_flops)
register_flops(torch.ops.dinowm.layernorm_linear_backward)(layernorm_linear_backward_flops)
