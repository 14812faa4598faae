"""Pure-PyTorch specifications of every kernel in this package.

Each `<op>_ref` is at once the numeric spec, the CPU fallback, the test oracle and the benchmark
baseline. Nothing here imports triton. Shapes:

    block_causal_attention_ref  q, k, v: (B, H, N, D); frame_ids: (N,) int; rope: (cos, sin) each (N, D) fp32
    layernorm_linear_ref        x: (..., K); ln_weight/ln_bias: (K,) or None; weight: (M, K); bias: (M,) or None
    tiled_embedding_ref         visual: (B, T, P, Dv); proprio: (B, T, Dp); action: (B, T, Da)

RoPE is represented by per-token, per-element tables so that one kernel serves both conventions of
docs/contract.md §11: for each pair (x[2i], x[2i+1])

    out[2i]   = x[2i]   * cos[2i]   - x[2i+1] * sin[2i]
    out[2i+1] = x[2i+1] * cos[2i+1] + x[2i]   * sin[2i+1]

The correct (interleaved) convention has cos[2i] == cos[2i+1] (a true rotation); the legacy
convention of the official V-JEPA 2-AC code indexes the angle by element j mod D/2 instead (not a
rotation). Unrotated dimensions have cos = 1, sin = 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# frame layouts
# ----------------------------------------------------------------------------------------------
def frame_ids_for(num_frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Frame id of every token of a frame-major sequence: (num_frames * tokens_per_frame,) int32."""
    return torch.arange(num_frames, device=device, dtype=torch.int32).repeat_interleave(tokens_per_frame)


def block_causal_mask(frame_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (N, N) mask: token i may attend to token j iff frame(j) <= frame(i)."""
    return frame_ids[None, :] <= frame_ids[:, None]


def cond_last_order(num_frames: int, tokens_per_frame: int, cond_tokens: int = 2, device=None) -> torch.Tensor:
    """Permutation (N,) of the AC layout putting all patch tokens first (frame by frame), then the
    `cond_tokens` conditioning tokens of every frame (frame by frame).

    The mask depends only on frame ids, so attention commutes with any permutation applied to q, k,
    v, frame ids and RoPE tables alike: `x[..., order, :]` permutes, `x[..., torch.argsort(order), :]`
    undoes it exactly. Fewer tiles straddle a frame boundary in the permuted layout (KERNELS.md).
    """
    idx = torch.arange(num_frames * tokens_per_frame, device=device).view(num_frames, tokens_per_frame)
    return torch.cat([idx[:, cond_tokens:].flatten(), idx[:, :cond_tokens].flatten()])


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
def rope_axis_width(head_dim: int) -> int:
    """Per-axis rotated width of 3-axis RoPE: 2 * floor(floor(head_dim / 3) / 2) (docs/contract.md §11)."""
    return 2 * ((head_dim // 3) // 2)


def rope_tables(positions: torch.Tensor, head_dim: int, legacy: bool = False, base: float = 10000.0):
    """cos/sin tables (N, head_dim) fp32 for 3-axis RoPE.

    positions: (N, 3) positions (time, height, width) of every token. The head dimension is split
    into three chunks of width D = rope_axis_width(head_dim) (time | height | width); the remaining
    head_dim - 3D dimensions are not rotated. Frequencies w_k = base^(-2k/D), k < D/2.
    """
    width = rope_axis_width(head_dim)
    n = positions.shape[0]
    cos = torch.ones(n, head_dim, dtype=torch.float32, device=positions.device)
    sin = torch.zeros(n, head_dim, dtype=torch.float32, device=positions.device)
    if width == 0:
        return cos, sin
    k = torch.arange(width // 2, dtype=torch.float64, device=positions.device)
    omega = base ** (-2.0 * k / width)  # (D/2,)
    if legacy:
        # official code: angle table [w_0..w_{D/2-1}, w_0..w_{D/2-1}], element j uses w_{j mod D/2}
        per_element = omega.repeat(2)
    else:
        # true rotation: both elements of pair i use w_i
        per_element = omega.repeat_interleave(2)
    for axis in range(3):
        angle = positions[:, axis].to(torch.float64)[:, None] * per_element[None, :]  # (N, D)
        cols = slice(axis * width, (axis + 1) * width)
        cos[:, cols] = angle.cos().float()
        sin[:, cols] = angle.sin().float()
    return cos, sin


def ac_token_positions(num_frames: int, height: int, width: int, cond_tokens: int = 2, device=None):
    """Positions (N, 3) and frame ids (N,) of the AC predictor's interleaved sequence.

    Per frame t: `cond_tokens` conditioning tokens (action, state) at (t, 0, 0), then the H*W patches
    row-major at (t, h, w). N = num_frames * (cond_tokens + H*W).
    """
    hh, ww = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    patch_pos = torch.stack([torch.zeros(height * width, dtype=torch.long), hh.flatten(), ww.flatten()], 1)
    cond_pos = torch.zeros(cond_tokens, 3, dtype=torch.long)
    per_frame = torch.cat([cond_pos, patch_pos])  # (N_T, 3)
    frames = []
    for t in range(num_frames):
        pos = per_frame.clone()
        pos[:, 0] = t
        frames.append(pos)
    positions = torch.cat(frames).to(device)
    frame_ids = frame_ids_for(num_frames, cond_tokens + height * width, device)
    return positions, frame_ids


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the per-element RoPE tables to x (..., N, D); returns x's dtype (computed in fp32, fp64
    for fp64 inputs)."""
    xf = x.double() if x.dtype == torch.float64 else x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    x_even, x_odd = pairs.unbind(-1)
    swapped = torch.stack((-x_odd, x_even), dim=-1).flatten(-2)  # [-x1, x0, -x3, x2, ...]
    return (xf * cos + swapped * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def block_causal_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frame_ids: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Frame-block-causal attention with explicit scores, mask and softmax.

    q, k, v: (B, H, N, D); frame_ids: (N,); rope: optional (cos, sin) (N, D) applied to q and k.
    Returns (B, H, N, D) in q's dtype. Softmax is computed in fp32 (fp64 for fp64 inputs).
    dropout_keep: optional (B, H, N, N) bool keep mask to use instead of drawing one (reproduces a
    kernel's dropout in tests): probs * keep / (1 - dropout_p).
    """
    if rope is not None:
        q = apply_rope_ref(q, *rope)
        k = apply_rope_ref(k, *rope)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale  # (B, H, N, N)
    scores = scores.masked_fill(~block_causal_mask(frame_ids.to(q.device)), float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v.to(compute)).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# LayerNorm -> Linear
# ----------------------------------------------------------------------------------------------
def layernorm_linear_ref(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """y = Linear(LayerNorm(x)). x: (..., K), weight: (M, K) -> (..., M)."""
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)


# ----------------------------------------------------------------------------------------------
# tiled Conv1d(k=1) embedding
# ----------------------------------------------------------------------------------------------
def tiled_embedding_ref(
    visual: torch.Tensor,
    proprio: torch.Tensor,
    action: torch.Tensor,
    proprio_weight: torch.Tensor,
    proprio_bias: torch.Tensor,
    action_weight: torch.Tensor,
    action_bias: torch.Tensor,
) -> torch.Tensor:
    """[visual | Conv1d(proprio) | Conv1d(action)] broadcast over patches.

    visual: (B, T, P, Dv); proprio: (B, T, Dp); action: (B, T, Da);
    proprio_weight: (Ep, Dp) (a Conv1d weight (Ep, Dp, 1) squeezed); action_weight: (Ea, Da).
    Returns (B, T, P, Dv + Ep + Ea), the order of docs/contract.md §4 (visual, proprio, action).
    The embeddings are computed in the inputs' dtype, never under autocast (as the Triton kernel: fp32
    accumulation), and cast to visual's dtype.
    """
    b, t, p, _ = visual.shape
    with torch.autocast(visual.device.type, enabled=False):
        proprio_emb = F.linear(proprio, proprio_weight, proprio_bias)  # (B, T, Ep)
        action_emb = F.linear(action, action_weight, action_bias)  # (B, T, Ea)
    return torch.cat(
        [
            visual,
            proprio_emb[:, :, None, :].expand(b, t, p, -1).to(visual.dtype),
            action_emb[:, :, None, :].expand(b, t, p, -1).to(visual.dtype),
        ],
        dim=-1,
    )
