"""Tiled Conv1d(k=1) embedding: [visual | proprio_emb | action_emb] broadcast over patches, in Triton.

Shapes: visual: (B, T, P, Dv); proprio: (B, T, Dp); action: (B, T, Da); proprio_weight: (Ep, Dp) and
action_weight: (Ea, Da) (Conv1d weights (E, D, 1) squeezed); biases (Ep,), (Ea,).
Output: (B, T, P, Dv + Ep + Ea) in visual's dtype, channel order visual, proprio, action (docs/contract.md §4).
`kernels.reference.tiled_embedding_ref` is the spec.

Forward (one kernel, programs own one (b, t) frame x BLOCK_P patches):

    pe = Wp @ proprio[b, t] + bp,  ae = Wa @ action[b, t] + ba      (fp32, tiny dots in registers)
    out[b, t, p, :Dv]           = visual[b, t, p, :]
    out[b, t, p, Dv:Dv+Ep]      = pe       for every patch p of the tile
    out[b, t, p, Dv+Ep:]        = ae

written straight into one preallocated buffer: the repeated (B, T, P, E) tensors and the
concatenation of the eager version never exist.

Backward, with g = d out (B, T, P, Dv + Ep + Ea):

    d visual  = g[..., :Dv]                                   (a view, no copy)
    dpe[b, t] = sum_p g[b, t, p, Dv:Dv+Ep],   dae likewise    (kernel, fp32, fixed order)
    d proprio = dpe @ Wp,  d action = dae @ Wa                (same kernel, in registers)
    dWp = dpe^T @ proprio, dbp = sum_bt dpe, dWa, dba likewise (tiny fp32 GEMMs in PyTorch)

Numerics: everything accumulates in fp32 (fp64 for fp64 inputs, for gradcheck); values are upcast
right after loading, so the interpreter's broken bf16 arithmetic (triton issue 11584) is never hit.
Limits: every tensor contiguous in its last dimension (the launcher copies otherwise); Dp, Da, Ep,
Ea <= 256 (they are held whole in registers).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .common import unit_last
from .flops import register_flops, tiled_embedding_backward_flops, tiled_embedding_flops

# one fixed configuration per kernel (autotune with several configs fails without a GPU driver)
FWD_CONFIG = dict(BLOCK_P=32, BLOCK_D=128, num_warps=4, num_stages=1)
BWD_CONFIG = dict(BLOCK_P=64, num_warps=4, num_stages=1)
MAX_SMALL_DIM = 256


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tiled_embedding_fwd_kernel(
    # pointers
    Visual,  # (B*T, P, Dv)
    Proprio,  # (B*T, Dp)
    Action,  # (B*T, Da)
    Wp,  # (Ep, Dp)
    Bp,  # (Ep,)
    Wa,  # (Ea, Da)
    Ba,  # (Ea,)
    Out,  # (B*T, P, Dv + Ep + Ea)
    # strides
    stride_v_f,
    stride_v_p,
    stride_pr_f,
    stride_ac_f,
    stride_wp_e,
    stride_wa_e,
    stride_o_f,
    stride_o_p,
    # sizes
    P,
    Dv,
    Dp,
    Da,
    Ep,
    Ea,
    # meta-parameters
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DP: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_EP: tl.constexpr,
    BLOCK_EA: tl.constexpr,
):
    frame = tl.program_id(0).to(tl.int64)
    ps = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = ps < P

    # -- the two tiny embeddings of this frame, fp32 --
    dp = tl.arange(0, BLOCK_DP)
    ep = tl.arange(0, BLOCK_EP)
    wp = tl.load(Wp + ep[:, None] * stride_wp_e + dp[None, :], mask=(ep < Ep)[:, None] & (dp < Dp)[None, :],
                 other=0.0).to(ACC_DTYPE)
    proprio = tl.load(Proprio + frame * stride_pr_f + dp, mask=dp < Dp, other=0.0).to(ACC_DTYPE)
    pe = tl.sum(wp * proprio[None, :], axis=1) + tl.load(Bp + ep, mask=ep < Ep, other=0.0).to(ACC_DTYPE)
    da = tl.arange(0, BLOCK_DA)
    ea = tl.arange(0, BLOCK_EA)
    wa = tl.load(Wa + ea[:, None] * stride_wa_e + da[None, :], mask=(ea < Ea)[:, None] & (da < Da)[None, :],
                 other=0.0).to(ACC_DTYPE)
    action = tl.load(Action + frame * stride_ac_f + da, mask=da < Da, other=0.0).to(ACC_DTYPE)
    ae = tl.sum(wa * action[None, :], axis=1) + tl.load(Ba + ea, mask=ea < Ea, other=0.0).to(ACC_DTYPE)

    # -- visual channels: a straight copy --
    out_rows = Out + frame * stride_o_f + ps[:, None] * stride_o_p  # (BLOCK_P, 1) row starts
    for d0 in range(0, Dv, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = p_mask[:, None] & (ds < Dv)[None, :]
        v = tl.load(Visual + frame * stride_v_f + ps[:, None] * stride_v_p + ds[None, :], mask=mask)
        tl.store(out_rows + ds[None, :], v.to(Out.dtype.element_ty), mask=mask)

    # -- embeddings broadcast over the patch tile --
    pe_tile = tl.broadcast_to(pe[None, :], (BLOCK_P, BLOCK_EP))
    tl.store(out_rows + Dv + ep[None, :], pe_tile.to(Out.dtype.element_ty), mask=p_mask[:, None] & (ep < Ep)[None, :])
    ae_tile = tl.broadcast_to(ae[None, :], (BLOCK_P, BLOCK_EA))
    tl.store(out_rows + Dv + Ep + ea[None, :], ae_tile.to(Out.dtype.element_ty),
             mask=p_mask[:, None] & (ea < Ea)[None, :])


@triton.jit
def _tiled_embedding_bwd_kernel(
    # pointers
    DOut,  # (B*T, P, Dv + Ep + Ea)
    Wp,  # (Ep, Dp)
    Wa,  # (Ea, Da)
    DPe,  # (B*T, Ep) fp32 out: patch sums of the proprio slice
    DAe,  # (B*T, Ea) fp32 out
    DProprio,  # (B*T, Dp) out
    DAction,  # (B*T, Da) out
    # strides
    stride_do_f,
    stride_do_p,
    stride_wp_e,
    stride_wa_e,
    stride_dpr_f,
    stride_dac_f,
    # sizes
    P,
    Dv,
    Dp,
    Da,
    Ep,
    Ea,
    # meta-parameters
    ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_DP: tl.constexpr,
    BLOCK_DA: tl.constexpr,
    BLOCK_EP: tl.constexpr,
    BLOCK_EA: tl.constexpr,
):
    frame = tl.program_id(0).to(tl.int64)
    ep = tl.arange(0, BLOCK_EP)
    ea = tl.arange(0, BLOCK_EA)
    offs_p = tl.arange(0, BLOCK_P)

    # -- sum the two embedding slices of the upstream gradient over patches (fixed order) --
    dpe = tl.zeros((BLOCK_EP,), dtype=ACC_DTYPE)
    dae = tl.zeros((BLOCK_EA,), dtype=ACC_DTYPE)
    for p0 in range(0, P, BLOCK_P):
        ps = (p0 + offs_p).to(tl.int64)
        rows = DOut + frame * stride_do_f + ps[:, None] * stride_do_p + Dv
        g = tl.load(rows + ep[None, :], mask=(ps < P)[:, None] & (ep < Ep)[None, :], other=0.0).to(ACC_DTYPE)
        dpe += tl.sum(g, axis=0)
        g = tl.load(rows + Ep + ea[None, :], mask=(ps < P)[:, None] & (ea < Ea)[None, :], other=0.0).to(ACC_DTYPE)
        dae += tl.sum(g, axis=0)
    tl.store(DPe + frame * Ep + ep, dpe, mask=ep < Ep)
    tl.store(DAe + frame * Ea + ea, dae, mask=ea < Ea)

    # -- input gradients: d proprio = dpe @ Wp, d action = dae @ Wa --
    dp = tl.arange(0, BLOCK_DP)
    wp = tl.load(Wp + ep[:, None] * stride_wp_e + dp[None, :], mask=(ep < Ep)[:, None] & (dp < Dp)[None, :],
                 other=0.0).to(ACC_DTYPE)
    tl.store(DProprio + frame * stride_dpr_f + dp, tl.sum(wp * dpe[:, None], axis=0).to(DProprio.dtype.element_ty),
             mask=dp < Dp)
    da = tl.arange(0, BLOCK_DA)
    wa = tl.load(Wa + ea[:, None] * stride_wa_e + da[None, :], mask=(ea < Ea)[:, None] & (da < Da)[None, :],
                 other=0.0).to(ACC_DTYPE)
    tl.store(DAction + frame * stride_dac_f + da, tl.sum(wa * dae[:, None], axis=0).to(DAction.dtype.element_ty),
             mask=da < Da)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(*tensors):
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _small_blocks(dp, da, ep, ea) -> dict:
    p2 = lambda n: max(triton.next_power_of_2(n), 2)
    return dict(BLOCK_DP=p2(dp), BLOCK_DA=p2(da), BLOCK_EP=p2(ep), BLOCK_EA=p2(ea))


def _check_inputs(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias):
    named = dict(visual=visual, proprio=proprio, action=action, proprio_weight=proprio_weight,
                 proprio_bias=proprio_bias, action_weight=action_weight, action_bias=action_bias)
    for name, t in named.items():
        if t.dtype not in _FLOATS:
            raise TypeError(f"tiled_embedding: {name} dtype {t.dtype} not supported; use one of {_FLOATS}")
        if t.device != visual.device:
            raise ValueError(f"tiled_embedding: {name} on {t.device}, visual on {visual.device}")
    if proprio.dim() != 3 or action.dim() != 3 or proprio.shape[:2] != action.shape[:2]:
        raise ValueError(f"tiled_embedding: proprio (B, T, Dp) and action (B, T, Da) must share (B, T), got "
                         f"{tuple(proprio.shape)} and {tuple(action.shape)}")
    b, t = proprio.shape[:2]
    if visual.dim() != 4 or visual.shape[:2] != (b, t):
        raise ValueError(f"tiled_embedding: visual must be (B, T, P, Dv) = ({b}, {t}, P, Dv), got {tuple(visual.shape)}")
    for name, w, bias, x in (("proprio", proprio_weight, proprio_bias, proprio),
                             ("action", action_weight, action_bias, action)):
        if w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"tiled_embedding: {name}_weight must be (E, {x.shape[-1]}) (Conv1d weight squeezed), "
                             f"got {tuple(w.shape)}")
        if bias.shape != (w.shape[0],):
            raise ValueError(f"tiled_embedding: {name}_bias must be ({w.shape[0]},), got {tuple(bias.shape)}")
        if max(w.shape) > MAX_SMALL_DIM:
            raise ValueError(f"tiled_embedding: {name} dims {tuple(w.shape)} exceed {MAX_SMALL_DIM}")


def tiled_embedding_fwd(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias):
    """-> (B, T, P, Dv + Ep + Ea) in visual's dtype."""
    _check_inputs(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias)
    b, t, dp = proprio.shape
    da = action.shape[-1]
    p, dv = visual.shape[-2:]
    ep, ea = proprio_weight.shape[0], action_weight.shape[0]
    vis = unit_last(visual.reshape(b * t, p, dv))  # (B*T, P, Dv)
    pr = unit_last(proprio.reshape(b * t, dp))  # (B*T, Dp)
    ac = unit_last(action.reshape(b * t, da))  # (B*T, Da)
    wp, wa = unit_last(proprio_weight), unit_last(action_weight)
    out = torch.empty(b * t, p, dv + ep + ea, dtype=visual.dtype, device=visual.device)  # (B*T, P, D)
    if out.numel() > 0:
        cfg = FWD_CONFIG
        grid = (b * t, triton.cdiv(p, cfg["BLOCK_P"]))
        _tiled_embedding_fwd_kernel[grid](
            vis, pr, ac, wp, proprio_bias, wa, action_bias, out,
            vis.stride(0), vis.stride(1), pr.stride(0), ac.stride(0), wp.stride(0), wa.stride(0),
            out.stride(0), out.stride(1),
            p, dv, dp, da, ep, ea,
            ACC_DTYPE=_acc_dtype(visual, proprio, action, wp, wa),
            **_small_blocks(dp, da, ep, ea), **cfg,
        )
    return out.reshape(b, t, p, dv + ep + ea)


def tiled_embedding_bwd(grad, proprio, action, proprio_weight, action_weight, dv):
    """grad: (B, T, P, Dv + Ep + Ea) -> d proprio (B, T, Dp), d action (B, T, Da),
    patch sums dpe (B*T, Ep) and dae (B*T, Ea) in fp32 (fp64 for fp64 inputs)."""
    b, t, dp = proprio.shape
    da = action.shape[-1]
    ep, ea = proprio_weight.shape[0], action_weight.shape[0]
    p = grad.shape[2]
    if grad.shape != (b, t, p, dv + ep + ea):
        raise ValueError(f"tiled_embedding: grad must be ({b}, {t}, P, {dv + ep + ea}), got {tuple(grad.shape)}")
    g = unit_last(grad).reshape(b * t, p, dv + ep + ea)  # (B*T, P, D)
    acc = _acc_dtype(grad, proprio, action, proprio_weight, action_weight)
    sums_dtype = torch.float64 if acc == tl.float64 else torch.float32
    dpe = torch.empty(b * t, ep, dtype=sums_dtype, device=grad.device)  # (B*T, Ep)
    dae = torch.empty(b * t, ea, dtype=sums_dtype, device=grad.device)  # (B*T, Ea)
    dproprio = torch.empty(b * t, dp, dtype=proprio.dtype, device=grad.device)  # (B*T, Dp)
    daction = torch.empty(b * t, da, dtype=action.dtype, device=grad.device)  # (B*T, Da)
    if b * t > 0:
        wp, wa = unit_last(proprio_weight), unit_last(action_weight)
        _tiled_embedding_bwd_kernel[(b * t,)](
            g, wp, wa, dpe, dae, dproprio, daction,
            g.stride(0), g.stride(1), wp.stride(0), wa.stride(0), dproprio.stride(0), daction.stride(0),
            p, dv, dp, da, ep, ea,
            ACC_DTYPE=acc, **_small_blocks(dp, da, ep, ea), **BWD_CONFIG,
        )
    return dproprio.reshape(b, t, dp), daction.reshape(b, t, da), dpe, dae


# ----------------------------------------------------------------------------------------------
# custom op + autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("dinowm::tiled_embedding", mutates_args=())
def _tiled_embedding_op(visual: torch.Tensor, proprio: torch.Tensor, action: torch.Tensor,
                        proprio_weight: torch.Tensor, proprio_bias: torch.Tensor, action_weight: torch.Tensor,
                        action_bias: torch.Tensor) -> torch.Tensor:
    return tiled_embedding_fwd(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias)


@_tiled_embedding_op.register_fake
def _(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias):
    b, t = proprio.shape[:2]
    p, dv = visual.shape[-2:]
    return visual.new_empty(b, t, p, dv + proprio_weight.shape[0] + action_weight.shape[0])


@torch.library.custom_op("dinowm::tiled_embedding_backward", mutates_args=())
def _tiled_embedding_backward_op(grad: torch.Tensor, proprio: torch.Tensor, action: torch.Tensor,
                                 proprio_weight: torch.Tensor, action_weight: torch.Tensor,
                                 dv: int) -> list[torch.Tensor]:
    """[d proprio, d action, dpe, dae]."""
    return list(tiled_embedding_bwd(grad, proprio, action, proprio_weight, action_weight, dv))


@_tiled_embedding_backward_op.register_fake
def _(grad, proprio, action, proprio_weight, action_weight, dv):
    b, t = proprio.shape[:2]
    sums = torch.float64 if torch.float64 in (grad.dtype, proprio.dtype, action.dtype, proprio_weight.dtype,
                                              action_weight.dtype) else torch.float32
    return [torch.empty_like(proprio), torch.empty_like(action),
            grad.new_empty(b * t, proprio_weight.shape[0], dtype=sums),
            grad.new_empty(b * t, action_weight.shape[0], dtype=sums)]


def _setup_context(ctx, inputs, output):
    visual, proprio, action, proprio_weight, _pb, action_weight, _ab = inputs
    ctx.dv = visual.shape[-1]
    ctx.bias_dtypes = (_pb.dtype, _ab.dtype)
    ctx.save_for_backward(proprio, action, proprio_weight, action_weight)


def _backward(ctx, grad):
    proprio, action, proprio_weight, action_weight = ctx.saved_tensors
    dproprio, daction, dpe, dae = _tiled_embedding_backward_op(grad, proprio, action, proprio_weight,
                                                               action_weight, ctx.dv)
    # tiny GEMMs over the B*T frames (fp32, deterministic)
    dwp = (dpe.t() @ proprio.reshape(-1, proprio.shape[-1]).to(dpe.dtype)).to(proprio_weight.dtype)  # (Ep, Dp)
    dwa = (dae.t() @ action.reshape(-1, action.shape[-1]).to(dae.dtype)).to(action_weight.dtype)  # (Ea, Da)
    dbp, dba = dpe.sum(0).to(ctx.bias_dtypes[0]), dae.sum(0).to(ctx.bias_dtypes[1])
    dvisual = grad[..., :ctx.dv]  # (B, T, P, Dv) view
    return dvisual, dproprio, daction, dwp, dbp, dwa, dba


_tiled_embedding_op.register_autograd(_backward, setup_context=_setup_context)


def tiled_embedding_triton(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias):
    """[visual | proprio_emb | action_emb] over patches in Triton -> (B, T, P, Dv + Ep + Ea).

    visual: (B, T, P, Dv); proprio: (B, T, Dp); action: (B, T, Da);
    proprio_weight: (Ep, Dp); proprio_bias: (Ep,); action_weight: (Ea, Da); action_bias: (Ea,).
    """
    return _tiled_embedding_op(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias)


# FLOP formulas: kernels.flops
register_flops(torch.ops.dinowm.tiled_embedding)(tiled_embedding_flops)
register_flops(torch.ops.dinowm.tiled_embedding_backward)(tiled_embedding_backward_flops)
