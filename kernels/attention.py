"""RoPE + frame-block-causal flash attention in Triton, forward and backward (FlashAttention-2 style).

Shapes: q, k, v, out: (B, H, N, D), D in {24, 32, 64} (any D <= 64 works; loads are masked to D and
the tile is padded to the next power of two); frame_ids: (N,) int; RoPE tables cos, sin: (N, D) fp32.

Math (per batch and head; f(i) is token i's frame id, `scale` defaults to 1/sqrt(D)):

    q~ = rope(q), k~ = rope(k)                 rope(x) = x * cos + rot(x) * sin,  rot(x) = [-x1, x0, -x3, x2, ...]
    S  = scale * q~ k~^T, S[i, j] = -inf unless f(j) <= f(i)
    P  = softmax(S) (row-wise), Z = keep / (1 - p_drop) (dropout, Z = 1 without)
    O  = (P * Z) V,    LSE[i] = log2 sum_j exp2(S[i, j] * log2 e)   (saved in fp32)

Backward (P recomputed from q, k and LSE; Delta = rowsum(dO * O) = rowsum(P * dP)):

    dV  = (P * Z)^T dO
    dP  = (dO V^T) * Z
    dS  = P * (dP - Delta)
    dq~ = scale * dS k~,  dk~ = scale * dS^T q~
    dq  = rope^T(dq~),    rope^T(g) = g * cos - rot(g * sin)   (the transposed map; the tables are
                                                             per element so both RoPE conventions work)

Tiling. The sequence is cut into query blocks of BLOCK_M rows and key blocks of BLOCK_N columns. From
frame_ids alone (`kernels.frames.block_maps`, cached per token layout in a `FrameLayout`), every
(query block, key block) pair is classified with the min/max
frame of each block: skipped (min f(key) > max f(query): no allowed entry), full (max f(key) <= min
f(query), and no padded row or column: no mask at all), or partial (everything else: the frame mask
is applied). Each query block gets the list of its full key blocks followed by its partial ones
(`KvCount` (M_blocks, 2), `KvIdx` (M_blocks, N_blocks)), each key block the transposed list for the
dk/dv kernel. Skipped tiles are never visited; only tiles straddling a frame boundary pay for the
mask. Any permutation of the tokens works (the lists need not be contiguous ranges), so the layout
trick of KERNELS.md (patch tokens first, conditioning tokens last; `kernels.reference.cond_last_order`)
only changes how many tiles are partial.

Kernels: `_attn_fwd_kernel` (grid: query blocks x B*H; q rotated once in the prologue, each key tile
as it is loaded), `_attn_bwd_dkdv_kernel` (key blocks x B*H, loops over query blocks),
`_attn_bwd_dq_kernel` (query blocks x B*H, loops over key blocks), `_rope_kernel` (writes q~, k~ for
the backward: rotating a tile per loop iteration there spills registers on sm_80, and the pass is
O(N D) against the O(N^2 D) of attention; the epilogues rotate dq~, dk~ back). No atomics: dq, dk
and dv are each written by exactly one program, so results are deterministic.

Dropout (attention probabilities, docs/contract.md §5): keep[i, j] = philox(seed + (b*H + h) << 32, i*N + j) >= p,
regenerated identically in both backward kernels; `dropout_keep_mask` reproduces it for tests.

Numerics: loads are upcast to ACC (fp32, fp64 for gradcheck) right away, RoPE is applied in ACC from
the fp32 tables, dot inputs are cast to DOT (the input dtype; fp32 for bf16 under the interpreter,
whose bf16 arithmetic is broken), dots accumulate in ACC, LSE/Delta are ACC. Limits: D <= 64, N <
46341 (int32 dropout offsets), no autotuning (one fixed config per padded head dim and dropout, chosen to
compile without spills on sm_80 and sm_90; see `CONFIGS` and `compile_specs`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import dot_dtype, interpreting, tl_dtypes, unit_last
from .frames import (CHECKED_DTYPES, CONFIGS, HEAD_DIMS, AttentionConfig, FrameLayout, block_maps,  # noqa: F401
                     config_for, pad_head_dim as _pad_head_dim)
from .flops import block_causal_attention_bwd_flops, block_causal_attention_flops, register_flops

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rotate_pairs(x, ROWS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...] along the last axis of a (ROWS, HEAD_DIM_PAD) tile."""
    pairs = tl.reshape(x, (ROWS, HEAD_DIM_PAD // 2, 2))
    even, odd = tl.split(pairs)
    return tl.reshape(tl.join(-odd, even), (ROWS, HEAD_DIM_PAD))


@triton.jit
def _rope_transpose(g, Cos, Sin, offs_n, offs_d, n_ctx,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, ROWS: tl.constexpr):
    """rope^T(g) = g * cos - rot(g * sin) of a (ROWS, HEAD_DIM_PAD) gradient tile (epilogues only)."""
    mask = (offs_n[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    table = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # tables are contiguous (N, D)
    cos = tl.load(Cos + table, mask=mask, other=1.0).to(g.dtype)
    sin = tl.load(Sin + table, mask=mask, other=0.0).to(g.dtype)
    return g * cos - _rotate_pairs(g * sin, ROWS, HEAD_DIM_PAD)


@triton.jit
def _load_tile(Base, offs_n, offs_d, stride_n, n_ctx, Cos, Sin,
               HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, ACC: tl.constexpr):
    """(len(offs_n), HEAD_DIM_PAD) tile of a (N, D) slice with unit last stride, zero-padded, upcast to
    ACC, rotated if ROPE: rope(x) = x * cos + rot(x) * sin, with rot(x)[d] = -+x[d ^ 1] read from
    memory (a second, cached load) rather than shuffled in registers."""
    mask = (offs_n[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    rows = Base + offs_n[:, None] * stride_n
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    if ROPE:
        partner = tl.load(rows + (offs_d ^ 1)[None, :], mask=mask, other=0.0).to(ACC)
        table = offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # tables are contiguous (N, D)
        cos = tl.load(Cos + table, mask=mask, other=1.0).to(ACC)
        sin = tl.load(Sin + table, mask=mask, other=0.0).to(ACC)
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0).to(ACC)
        x = x * cos + (sign[None, :] * partner) * sin
    return x


@triton.jit
def _dropout_keep(seed, offs_m, offs_n, n_ctx, dropout_p):
    """keep[i, j] for a (len(offs_m), len(offs_n)) tile; seed already carries the (b, h) key."""
    return tl.rand(seed, offs_m[:, None] * n_ctx + offs_n[None, :]) >= dropout_p


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, fq, offs_m, start_n,
                    K_bh, V_bh, Cos, Sin, seed,
                    stride_kn, stride_vn, n_ctx, qk_scale, dropout_p,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_ROPE: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                    DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, FrameIds):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = _load_tile(K_bh, offs_n, offs_d, stride_kn, n_ctx, Cos, Sin, HEAD_DIM, HAS_ROPE, ACC)
    v = _load_tile(V_bh, offs_n, offs_d, stride_vn, n_ctx, Cos, Sin, HEAD_DIM, False, ACC)
    # -- scores (log2 domain) --
    s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION, out_dtype=ACC) * qk_scale
    if MASKED:
        fk = tl.load(FrameIds + offs_n, mask=offs_n < n_ctx, other=2147483647)
        s = tl.where(fk[None, :] <= fq[:, None], s, float("-inf"))
    # -- online softmax --
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, offs_m, offs_n, n_ctx, dropout_p), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PRECISION, out_dtype=ACC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V,  # (B, H, N, D)
    Cos, Sin,  # (N, D) fp32, read if HAS_ROPE
    FrameIds,  # (N,) int32
    KvCount,  # (M_blocks, 2) int32: number of full, partial key blocks per query block
    KvIdx,  # (M_blocks, N_blocks) int32: full key blocks, then partial ones
    Seed,  # (1,) int64, read if HAS_DROPOUT
    Out,  # (B, H, N, D)
    Lse,  # (B, H, N) ACC: base-2 log-sum-exp of the scaled scores
    # strides
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    # sizes
    n_heads, n_ctx, n_kv_blocks,
    qk_scale, dropout_p,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + pid_bh.to(tl.int64) * 4294967296

    # -- query tile, rotated, kept in registers --
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qn, n_ctx, Cos, Sin,
                   HEAD_DIM, HAS_ROPE, ACC).to(DOT)
    fq = tl.load(FrameIds + offs_m, mask=offs_m < n_ctx, other=2147483647)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=ACC)
    n_full = tl.load(KvCount + pid_m * 2)
    n_partial = tl.load(KvCount + pid_m * 2 + 1)
    # -- full tiles: no mask --
    for it in range(0, n_full):
        start_n = tl.load(KvIdx + pid_m * n_kv_blocks + it) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, fq, offs_m, start_n, K_bh, V_bh, Cos, Sin, seed,
                                        stride_kn, stride_vn, n_ctx, qk_scale, dropout_p,
                                        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, HAS_ROPE, HAS_DROPOUT, False,
                                        DOT, ACC, PRECISION, FrameIds)
    # -- tiles straddling a frame boundary (or the end of the sequence): frame mask --
    for it in range(n_full, n_full + n_partial):
        start_n = tl.load(KvIdx + pid_m * n_kv_blocks + it) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, fq, offs_m, start_n, K_bh, V_bh, Cos, Sin, seed,
                                        stride_kn, stride_vn, n_ctx, qk_scale, dropout_p,
                                        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, HAS_ROPE, HAS_DROPOUT, True,
                                        DOT, ACC, PRECISION, FrameIds)

    # -- epilogue --
    row_ok = offs_m < n_ctx
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(Lse + pid_bh.to(tl.int64) * n_ctx + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)
    O_bh = Out + off_b * stride_ob + off_h * stride_oh
    tl.store(O_bh + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers
    Q, K, V, DO,  # (B, H, N, D); Q and K already rotated (`rope_fwd`)
    Cos, Sin,  # (N, D) fp32, read if HAS_ROPE (epilogue: gradients back through the rotation)
    FrameIds,  # (N,) int32
    QCount,  # (N_blocks, 2) int32: number of full, partial query blocks per key block
    QIdx,  # (N_blocks, M_blocks) int32: full query blocks, then partial ones
    Seed,  # (1,) int64, read if HAS_DROPOUT
    Lse, Delta,  # (B, H, N) ACC
    DK, DV,  # (B, H, N, D)
    # strides
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    # sizes
    n_heads, n_ctx, n_q_blocks,
    sm_scale, qk_scale, dropout_p,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    Q_bh = Q + off_b * stride_qb + off_h * stride_qh
    DO_bh = DO + off_b * stride_dob + off_h * stride_doh
    Lse_bh = Lse + pid_bh.to(tl.int64) * n_ctx
    Delta_bh = Delta + pid_bh.to(tl.int64) * n_ctx
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + pid_bh.to(tl.int64) * 4294967296
    inv_keep = 1.0 / (1.0 - dropout_p)

    # -- key/value tiles, rotated, kept in registers --
    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kn, n_ctx, Cos, Sin,
                   HEAD_DIM, False, ACC).to(DOT)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vn, n_ctx, Cos, Sin,
                   HEAD_DIM, False, ACC).to(DOT)
    fk = tl.load(FrameIds + offs_n, mask=offs_n < n_ctx, other=2147483647)

    dk = tl.zeros((BLOCK_N, HEAD_DIM_PAD), dtype=ACC)
    dv = tl.zeros((BLOCK_N, HEAD_DIM_PAD), dtype=ACC)
    n_full = tl.load(QCount + pid_n * 2)
    n_partial = tl.load(QCount + pid_n * 2 + 1)
    for it in range(0, n_full + n_partial):
        start_m = tl.load(QIdx + pid_n * n_q_blocks + it) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q_bh, offs_m, offs_d, stride_qn, n_ctx, Cos, Sin, HEAD_DIM, False, ACC).to(DOT)
        do = _load_tile(DO_bh, offs_m, offs_d, stride_don, n_ctx, Cos, Sin, HEAD_DIM, False, ACC).to(DOT)
        lse = tl.load(Lse_bh + offs_m, mask=offs_m < n_ctx, other=0.0)
        delta = tl.load(Delta_bh + offs_m, mask=offs_m < n_ctx, other=0.0)
        # -- transposed probabilities P^T (BLOCK_N, BLOCK_M) --
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        if it >= n_full:
            fq = tl.load(FrameIds + offs_m, mask=offs_m < n_ctx, other=-1)
            s_t = tl.where(fk[:, None] <= fq[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
        if HAS_DROPOUT:
            keep_t = tl.rand(seed, offs_m[None, :] * n_ctx + offs_n[:, None]) >= dropout_p
            dv += tl.dot(tl.where(keep_t, p_t * inv_keep, 0.0).to(DOT), do, input_precision=PRECISION,
                         out_dtype=ACC)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            dv += tl.dot(p_t.to(DOT), do, input_precision=PRECISION, out_dtype=ACC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(DOT), q, input_precision=PRECISION, out_dtype=ACC)

    # -- epilogue: dk~ -> dk through the transposed rotation --
    dk = dk * sm_scale
    if HAS_ROPE:
        dk = _rope_transpose(dk, Cos, Sin, offs_n, offs_d, n_ctx, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
    store_mask = (offs_n[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    DK_bh = DK + off_b * stride_dkb + off_h * stride_dkh
    DV_bh = DV + off_b * stride_dvb + off_h * stride_dvh
    tl.store(DK_bh + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV_bh + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    Q, K, V, DO,  # (B, H, N, D); Q and K already rotated (`rope_fwd`)
    Cos, Sin,  # (N, D) fp32, read if HAS_ROPE (epilogue: gradients back through the rotation)
    FrameIds,  # (N,) int32
    KvCount,  # (M_blocks, 2) int32
    KvIdx,  # (M_blocks, N_blocks) int32
    Seed,  # (1,) int64, read if HAS_DROPOUT
    Lse, Delta,  # (B, H, N) ACC
    DQ,  # (B, H, N, D)
    # strides
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    # sizes
    n_heads, n_ctx, n_kv_blocks,
    sm_scale, qk_scale, dropout_p,
    # meta-parameters
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < n_ctx
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(Seed) + pid_bh.to(tl.int64) * 4294967296
    inv_keep = 1.0 / (1.0 - dropout_p)

    # -- query-side tiles kept in registers --
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qn, n_ctx, Cos, Sin,
                   HEAD_DIM, False, ACC).to(DOT)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_don, n_ctx, Cos, Sin,
                    HEAD_DIM, False, ACC).to(DOT)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * n_ctx + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * n_ctx + offs_m, mask=row_ok, other=0.0)
    fq = tl.load(FrameIds + offs_m, mask=row_ok, other=2147483647)

    dq = tl.zeros((BLOCK_M, HEAD_DIM_PAD), dtype=ACC)
    n_full = tl.load(KvCount + pid_m * 2)
    n_partial = tl.load(KvCount + pid_m * 2 + 1)
    for it in range(0, n_full + n_partial):
        start_n = tl.load(KvIdx + pid_m * n_kv_blocks + it) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K_bh, offs_n, offs_d, stride_kn, n_ctx, Cos, Sin, HEAD_DIM, False, ACC).to(DOT)
        v = _load_tile(V_bh, offs_n, offs_d, stride_vn, n_ctx, Cos, Sin, HEAD_DIM, False, ACC).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        if it >= n_full:
            fk = tl.load(FrameIds + offs_n, mask=offs_n < n_ctx, other=2147483647)
            s = tl.where(fk[None, :] <= fq[:, None], s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        if HAS_DROPOUT:
            dp = tl.where(_dropout_keep(seed, offs_m, offs_n, n_ctx, dropout_p), dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DOT), k, input_precision=PRECISION, out_dtype=ACC)

    # -- epilogue: dq~ -> dq through the transposed rotation --
    dq = dq * sm_scale
    if HAS_ROPE:
        dq = _rope_transpose(dq, Cos, Sin, offs_m, offs_d, n_ctx, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    DQ_bh = DQ + off_b * stride_dqb + off_h * stride_dqh
    tl.store(DQ_bh + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dropout_mask_kernel(
    Seed,  # (1,) int64
    Keep,  # (B*H, N, N) int8
    n_ctx, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    seed = tl.load(Seed) + pid_bh.to(tl.int64) * 4294967296
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, offs_m, offs_n, n_ctx, dropout_p)
    ptrs = Keep + pid_bh.to(tl.int64) * n_ctx * n_ctx + offs_m[:, None] * n_ctx + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < n_ctx) & (offs_n[None, :] < n_ctx))


@triton.jit
def _rope_kernel(
    X,  # (B, H, N, D)
    Cos, Sin,  # (N, D) fp32
    Out,  # (B, H, N, D) contiguous
    stride_xb, stride_xh, stride_xn,
    n_heads, n_ctx,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    x = _load_tile(X + off_b * stride_xb + off_h * stride_xh, offs_n, offs_d, stride_xn, n_ctx, Cos, Sin,
                   HEAD_DIM, True, ACC)
    ptrs = Out + pid_bh.to(tl.int64) * n_ctx * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ptrs, x.to(Out.dtype.element_ty), mask=(offs_n[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _dtypes(dtype: torch.dtype):
    """(DOT, ACC, PRECISION, acc torch dtype) for an input dtype."""
    if dtype not in tl_dtypes():
        raise TypeError(f"attention: unsupported dtype {dtype}; use fp16, bf16, fp32 or fp64")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dot = dot_dtype(dtype)
    precision = "ieee" if dot in (tl.float32, tl.float64) else "tf32"
    return dot, tl_dtypes()[acc], precision, acc


def _check_inputs(q, k, v, frame_ids, cos, sin):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in CHECKED_DTYPES and not interpreting():
        raise TypeError(f"attention: {q.dtype} inputs on {q.device.type}: the Triton configurations are "
                        f"compile-checked for fp16/bf16 only (python -m kernels.compile_check); use the sdpa "
                        f"backend (what auto picks)")
    n, d = q.shape[2], q.shape[3]
    if frame_ids.shape != (n,):
        raise ValueError(f"frame_ids must be ({n},), got {tuple(frame_ids.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("rope needs both cos and sin")
    if cos is not None and (cos.shape != (n, d) or sin.shape != (n, d)):
        raise ValueError(f"rope tables must be ({n}, {d}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if n >= 46341:
        raise ValueError(f"sequence length {n} too long for int32 dropout offsets")
    config_for(d)


def _bhn_strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def attention_fwd(q, k, v, frame_ids, cos=None, sin=None, seed=None, scale=None, dropout_p=0.0,
                  config: AttentionConfig | None = None, out=None, lse=None, tiles=None):
    """Forward launcher. q, k, v: (B, H, N, D); frame_ids: (N,); cos, sin: (N, D) fp32 or None;
    seed: (1,) int64 when dropout_p > 0. Returns out (B, H, N, D) and lse (B, H, N) fp32 (fp64 for
    fp64 inputs). `out`/`lse` may be passed preallocated (tests poison them). tiles: the (kv_count,
    kv_idx) lists at the config's forward tile sizes (`FrameLayout.tiles`), or None: built now."""
    _check_inputs(q, k, v, frame_ids, cos, sin)
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    b, h, n, d = q.shape
    has_rope, has_dropout = cos is not None, dropout_p > 0.0
    block_m, block_n, num_warps, num_stages = (config or config_for(d, has_dropout)).fwd
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dot, acc, precision, acc_dtype = _dtypes(q.dtype)
    if has_dropout and seed is None:
        raise ValueError("dropout_p > 0 needs a seed")
    frame_ids = frame_ids.to(device=q.device, dtype=torch.int32).contiguous()
    kv_count, kv_idx = tiles if tiles is not None else block_maps(frame_ids, block_m, block_n)[:2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty((b, h, n), device=q.device, dtype=acc_dtype) if lse is None else lse
    dummy = frame_ids  # any pointer: never read when the feature is off
    cos = cos.float().contiguous() if has_rope else dummy
    sin = sin.float().contiguous() if has_rope else dummy
    grid = (triton.cdiv(n, block_m), b * h)
    _attn_fwd_kernel[grid](
        q, k, v, cos, sin, frame_ids, kv_count, kv_idx, seed if has_dropout else dummy, out, lse,
        *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(out),
        h, n, kv_idx.shape[1], scale * LOG2E, float(dropout_p),
        HEAD_DIM=d, HEAD_DIM_PAD=_pad_head_dim(d), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ROPE=has_rope, HAS_DROPOUT=has_dropout, DOT=dot, ACC=acc, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


ROPE_BLOCK, ROPE_WARPS = 64, 8  # no stack on sm_80 at every head dim (32 rows x 4 warps has some)


def rope_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope(x) for x (B, H, N, D) from fp32 tables (N, D), computed in fp32 (fp64 for fp64 x), stored
    in x's dtype like the fused forward's dot inputs. The backward kernels read q~, k~ from it: rotating
    them inside the loops costs registers (spills on sm_80) for a pass that is O(N D), not O(N^2 D)."""
    b, h, n, d = x.shape
    x = unit_last(x)
    out = torch.empty((b, h, n, d), device=x.device, dtype=x.dtype)
    _rope_kernel[(triton.cdiv(n, ROPE_BLOCK), b * h)](
        x, cos, sin, out, *_bhn_strides(x), h, n,
        HEAD_DIM=d, HEAD_DIM_PAD=_pad_head_dim(d), BLOCK=ROPE_BLOCK, ACC=_dtypes(x.dtype)[1], num_warps=ROPE_WARPS,
    )
    return out


def attention_bwd(do, q, k, v, out, lse, frame_ids, cos=None, sin=None, seed=None, scale=None, dropout_p=0.0,
                  config: AttentionConfig | None = None, dq=None, dk=None, dv=None, tiles=None):
    """Backward launcher: dq, dk, dv (B, H, N, D) from dO and the forward's out and lse. tiles: the
    (q_count, q_idx) lists at the dkdv tile sizes and the (kv_count, kv_idx) lists at the dq tile sizes,
    or None: built now."""
    _check_inputs(q, k, v, frame_ids, cos, sin)
    q, k, v, do = unit_last(q), unit_last(k), unit_last(v), unit_last(do)
    b, h, n, d = q.shape
    has_rope, has_dropout = cos is not None, dropout_p > 0.0
    cfg = config or config_for(d, has_dropout)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dot, acc, precision, acc_dtype = _dtypes(q.dtype)
    frame_ids = frame_ids.to(device=q.device, dtype=torch.int32).contiguous()
    delta = (do.to(acc_dtype) * out.to(acc_dtype)).sum(-1).contiguous()  # (B, H, N)
    lse = lse.contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    dummy = frame_ids
    cos = cos.float().contiguous() if has_rope else dummy
    sin = sin.float().contiguous() if has_rope else dummy
    if has_rope:
        q, k = rope_fwd(q, cos, sin), rope_fwd(k, cos, sin)  # q~, k~ (B, H, N, D)
    seed = seed if has_dropout else dummy
    meta = dict(HEAD_DIM=d, HEAD_DIM_PAD=_pad_head_dim(d), HAS_ROPE=has_rope, HAS_DROPOUT=has_dropout,
                DOT=dot, ACC=acc, PRECISION=precision)
    common = (*_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do))

    block_m, block_n, num_warps, num_stages = cfg.dkdv
    q_count, q_idx = tiles[:2] if tiles is not None else block_maps(frame_ids, block_m, block_n)[2:]
    _attn_bwd_dkdv_kernel[(triton.cdiv(n, block_n), b * h)](
        q, k, v, do, cos, sin, frame_ids, q_count, q_idx, seed, lse, delta, dk, dv,
        *common, *_bhn_strides(dk), *_bhn_strides(dv),
        h, n, q_idx.shape[1], scale, scale * LOG2E, float(dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta,
    )
    block_m, block_n, num_warps, num_stages = cfg.dq
    kv_count, kv_idx = tiles[2:] if tiles is not None else block_maps(frame_ids, block_m, block_n)[:2]
    _attn_bwd_dq_kernel[(triton.cdiv(n, block_m), b * h)](
        q, k, v, do, cos, sin, frame_ids, kv_count, kv_idx, seed, lse, delta, dq,
        *common, *_bhn_strides(dq),
        h, n, kv_idx.shape[1], scale, scale * LOG2E, float(dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **meta,
    )
    return dq, dk, dv


def dropout_keep_mask(seed: torch.Tensor, batch: int, heads: int, n_ctx: int, dropout_p: float) -> torch.Tensor:
    """The keep mask (B, H, N, N) bool the kernels draw for `seed` (for tests and debugging)."""
    keep = torch.empty((batch * heads, n_ctx, n_ctx), dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(n_ctx, 32), triton.cdiv(n_ctx, 32), batch * heads)
    _dropout_mask_kernel[grid](seed, keep, n_ctx, float(dropout_p), BLOCK_M=32, BLOCK_N=32)
    return keep.view(batch, heads, n_ctx, n_ctx).bool()


# ----------------------------------------------------------------------------------------------
# custom op + autograd
# ----------------------------------------------------------------------------------------------
def _config_from(blocks: list[int], head_dim: int, dropout_p: float) -> AttentionConfig:
    """The shipped config, or the six tile sizes of `AttentionConfig.blocks()` (tests) with its warps/stages."""
    base = config_for(head_dim, dropout_p > 0.0)
    if not blocks:
        return base
    return AttentionConfig(fwd=(*blocks[0:2], *base.fwd[2:]), dkdv=(*blocks[2:4], *base.dkdv[2:]),
                           dq=(*blocks[4:6], *base.dq[2:]))


@torch.library.custom_op("dinowm::block_causal_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_ids: torch.Tensor,
                  cos: torch.Tensor | None, sin: torch.Tensor | None, seed: torch.Tensor | None,
                  tiles: list[torch.Tensor], scale: float, dropout_p: float,
                  blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """tiles: [] (built per call) or the six lists of `_tiles_for` (forward, dkdv, dq)."""
    return attention_fwd(q, k, v, frame_ids, cos, sin, seed, scale, dropout_p,
                         _config_from(blocks, q.shape[-1], dropout_p), tiles=tiles[:2] or None)


@_attention_op.register_fake
def _(q, k, v, frame_ids, cos, sin, seed, tiles, scale, dropout_p, blocks):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=acc)


@torch.library.custom_op("dinowm::block_causal_attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, frame_ids: torch.Tensor, cos: torch.Tensor | None,
                      sin: torch.Tensor | None, seed: torch.Tensor | None, tiles: list[torch.Tensor], scale: float,
                      dropout_p: float, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, out, lse, frame_ids, cos, sin, seed, scale, dropout_p,
                         _config_from(blocks, q.shape[-1], dropout_p), tiles=tiles[2:] or None)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, frame_ids, cos, sin, seed, tiles, scale, dropout_p, blocks):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, frame_ids, cos, sin, seed, tiles, scale, dropout_p, blocks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, frame_ids, cos, sin, seed, *tiles)
    ctx.scale, ctx.dropout_p, ctx.blocks = scale, dropout_p, blocks
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, frame_ids, cos, sin, seed, *tiles = ctx.saved_tensors
    no_tiles = [None] * len(tiles)  # the gradient structure must mirror the inputs' (a list)
    if dout is None:
        return None, None, None, None, None, None, None, no_tiles, None, None, None
    # the same seed tensor as the forward: the backward regenerates the forward's dropout mask
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, frame_ids, cos, sin, seed, tiles, ctx.scale,
                                   ctx.dropout_p, ctx.blocks)
    return dq, dk, dv, None, None, None, None, no_tiles, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _tiles_for(layout: FrameLayout, config: AttentionConfig) -> list[torch.Tensor]:
    """The tile lists each kernel of `config` walks: forward (kv_count, kv_idx), dkdv (q_count, q_idx),
    dq (kv_count, kv_idx); cached in the layout at the shipped tile sizes."""
    return [*layout.tiles(*config.fwd[:2])[:2], *layout.tiles(*config.dkdv[:2])[2:],
            *layout.tiles(*config.dq[:2])[:2]]


def block_causal_attention_triton(q, k, v, frames, rope=None, scale=None, dropout_p=0.0, config=None, seed=None):
    """RoPE + frame-block-causal attention. q, k, v: (B, H, N, D); frames: a `FrameLayout` or frame ids
    (N,); rope: (cos, sin) (N, D) fp32 or None -> (B, H, N, D). Dropout on the attention probabilities
    with probability dropout_p, drawn from `seed` ((1,) int64 on q's device, see kernels/dropout.py); without
    one, a seed is drawn from torch's generator (eager callers: tests, benchmarks)."""
    cos, sin = rope if rope is not None else (None, None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0 and seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=q.device)
    if dropout_p <= 0.0:
        seed = None
    cfg = config or config_for(q.shape[-1], dropout_p > 0.0)
    if isinstance(frames, FrameLayout):
        frame_ids, tiles = frames.frame_ids, _tiles_for(frames, cfg)
    else:  # frame ids: the op builds the tile lists per call (device ops, no host read)
        frame_ids, tiles = frames.to(torch.int32), []
    out, _ = _attention_op(q, k, v, frame_ids, cos, sin, seed, tiles, scale, float(dropout_p), cfg.blocks())
    return out


# FLOP formulas: kernels.flops
register_flops(torch.ops.dinowm.block_causal_attention)(block_causal_attention_flops)
register_flops(torch.ops.dinowm.block_causal_attention_bwd)(block_causal_attention_bwd_flops)
