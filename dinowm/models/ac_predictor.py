"""The action-conditioned predictor of V-JEPA 2-AC (`ACPredictor`), our own definition with the official
parameter names (docs/contract.md §11; docs/ac_predictor.md).

    x: (B, T, P, D_enc) encoder features (or earlier raw predictions), P = H*W patches row-major
    actions: (B, T, A), states: (B, T, S)       the action taken after frame t and the state at frame t
    tokens = predictor_embed(LN(x))             parameter-free LayerNorm (eps 1e-5) fused with the Linear
    per frame t: [action_encoder(a_t), state_encoder(s_t), tokens of frame t]   N_T = 2 + P tokens
    depth x (pre-norm, no dropout, LayerNorm eps 1e-6):
        x = x + attn.proj(attention(rope(q), rope(k), v))    q, k, v = split(attn.qkv(norm1(x))), qkv bias
        x = x + mlp.fc2(GELU(mlp.fc1(norm2(x))))              hidden = mlp_ratio * d, exact GELU
    drop the 2 conditioning tokens of every frame; predictor_proj(predictor_norm(x))  -> (B, T, P, D_enc)

Output frame t is the prediction of frame t + 1 from frames <= t. The mask is frame-block causal on the
interleaved sequence: token i sees token j iff frame(j) <= frame(i).

RoPE, on q and k in every layer: the head dim splits into time | height | width chunks of width
2 * floor(floor(head_dim / 3) / 2) (the tail is not rotated); patch (t, h, w) is at positions (t, h, w),
the conditioning tokens of frame t at (t, 0, 0) (time chunk only). Time counts from the first frame of
the rollout. `rope_legacy = True` is the official code's angle layout (what its checkpoints were trained
with; not a true rotation), False the true rotation. Tables: `kernels.reference.rope_tables`.

Kernels: norm1 -> attn.qkv, norm2 -> mlp.fc1 and LN -> predictor_embed go through
`kernels.layernorm_linear`; attention through `kernels.block_causal_attention` (RoPE fused on the
Triton path). When attention resolves to the Triton kernel, the whole block stack runs on the
conditioning-last permutation of the sequence (`kernels.cond_last_order`: patch tokens of every frame
first, then the conditioning tokens), which leaves fewer partly masked tiles; every op but attention is
per token and attention depends only on frame ids, so the permutation is exact, and dropping the
conditioning tokens afterwards is a slice. Frame ids, RoPE tables, the permutation and the Triton tile
lists are built once per shape: at construction for 1 .. num_frames frames (the training shapes; then
the forward and backward trace under torch.compile(fullgraph=True) without host reads), on first use
for others. The "reference model" is this model with reference backends in fp32.

KV cache (`KVCache`): under the block-causal mask frame t's keys and values never depend on later
frames, so a rollout may keep the rotated keys and values of past frames per layer and run only the new
frame's tokens (queries of frame t see every cached key: no mask). Exact, not an approximation.

Parameters at D_enc 1024, A = S = 2, d 384, depth 24, 16 heads: 43,378,048.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import block_causal_attention, cond_last_order, layernorm_linear
from kernels.dispatch import attention_backend_for, attention_dtype
from kernels.frames import FrameLayout
from kernels.reference import ac_token_positions, apply_rope_ref, rope_tables

COND_TOKENS = 2  # action, state
INPUT_LN_EPS = 1e-5  # the parameter-free layer norm of the features (as the official training script)
INIT_STD = 0.02


class TokenLayout(FrameLayout):
    """Per-shape constants of a forward, in the order the blocks run on: the frame layout (frame ids, and
    the Triton tile lists when permuted), RoPE tables cos, sin (N, head_dim) fp32, `order` (N,) the
    permutation of the interleaved sequence (None: interleaved), `tokens_per_frame`. Non-persistent
    buffers: they follow .to(device) and are not in the state dict."""

    def __init__(self, frame_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, order: torch.Tensor | None,
                 tokens_per_frame: int, head_dim: int):
        super().__init__(frame_ids, head_dim if order is not None else None)  # tiles: only Triton permutes
        # the tables stay fp32 when the model is cast (model.to(torch.bfloat16) casts floating buffers):
        # kept as their int32 bit patterns, viewed back as fp32 (free) when read
        self.register_buffer("cos_bits", cos.float().contiguous().view(torch.int32), persistent=False)
        self.register_buffer("sin_bits", sin.float().contiguous().view(torch.int32), persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.tokens_per_frame = tokens_per_frame

    @property
    def cos(self) -> torch.Tensor:
        return self.cos_bits.view(torch.float32)

    @property
    def sin(self) -> torch.Tensor:
        return self.sin_bits.view(torch.float32)


class KVCache:
    """Rotated keys and values (B, heads, N_cached, head_dim) of the frames processed so far, per layer."""

    def __init__(self, depth: int):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth
        self.frames = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class ACAttention(nn.Module):
    """Holds the official `attn.qkv` / `attn.proj`; the block computes with them (LN fused into qkv)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)


class ACMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class ACBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, attention_backend: str, ln_backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ACAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ACMlp(dim, mlp_hidden)
        self.attention_backend = attention_backend
        self.ln_backend = ln_backend

    def forward(self, x: torch.Tensor, layout: TokenLayout, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x: (B, N, d) -> (B, N, d). With a cache, x holds only the new frames' tokens."""
        b, n, d = x.shape
        qkv = layernorm_linear(x, self.norm1.weight, self.norm1.bias, self.attn.qkv.weight, self.attn.qkv.bias,
                               self.norm1.eps, backend=self.ln_backend)  # (B, N, 3d)
        q, k, v = qkv.view(b, n, 3, self.attn.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        if cache is None:
            out = block_causal_attention(q, k, v, layout, rope=(layout.cos, layout.sin),
                                         backend=self.attention_backend)  # (B, H, N, Dh)
        else:
            out = _cached_attention(q, k, v, layout, cache, layer)
        x = x + self.attn.proj(out.transpose(1, 2).reshape(b, n, d))
        h = layernorm_linear(x, self.norm2.weight, self.norm2.bias, self.mlp.fc1.weight, self.mlp.fc1.bias,
                             self.norm2.eps, backend=self.ln_backend)  # (B, N, hidden)
        return x + self.mlp.fc2(F.gelu(h))


def _cached_attention(q, k, v, layout: TokenLayout, cache: KVCache, layer: int) -> torch.Tensor:
    """New frames' queries against the cached keys plus the new ones, frame by frame (no mask needed).

    q, k, v: (B, H, n_new, Dh) of whole new frames in interleaved order -> (B, H, n_new, Dh)."""
    q = apply_rope_ref(q, layout.cos, layout.sin)
    k = apply_rope_ref(k, layout.cos, layout.sin)
    cached = 0 if cache.keys[layer] is None else cache.keys[layer].shape[2]
    k_all, v_all = cache.append(layer, k, v)  # (B, H, cached + n_new, Dh)
    per_frame = layout.tokens_per_frame
    outs = []
    for start in range(0, q.shape[2], per_frame):
        end = cached + start + per_frame
        outs.append(F.scaled_dot_product_attention(q[:, :, start:start + per_frame], k_all[:, :, :end],
                                                   v_all[:, :, :end]))  # (B, H, N_T, Dh)
    return torch.cat(outs, dim=2)


class ACPredictor(nn.Module):
    """forward(x (B, T, P, D_enc), actions (B, T, A), states (B, T, S)) -> predictions (B, T, P, D_enc)."""

    activation_checkpointing = False  # training.activation_checkpointing (set by dinowm.perf.configure)

    def __init__(self, visual_dim: int, action_dim: int, state_dim: int, grid: tuple[int, int],
                 dim: int = 384, depth: int = 24, heads: int = 16, mlp_ratio: float = 4.0, rope_legacy: bool = False,
                 attention_backend: str = "auto", layernorm_linear_backend: str = "auto", num_frames: int = 0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"ACPredictor: width {dim} is not a multiple of heads {heads}")
        self.visual_dim, self.action_dim, self.state_dim = visual_dim, action_dim, state_dim
        self.grid = tuple(grid)
        self.num_patches = grid[0] * grid[1]
        self.dim, self.depth, self.heads = dim, depth, heads
        self.head_dim = dim // heads
        self.rope_legacy = rope_legacy
        self.attention_backend = attention_backend
        self.ln_backend = layernorm_linear_backend
        self.predictor_embed = nn.Linear(visual_dim, dim)
        self.embed_tap = nn.Identity()  # a stage for `train.py --inspect` hooks (the fused op has no module)
        self.action_encoder = nn.Linear(action_dim, dim)
        self.state_encoder = nn.Linear(state_dim, dim)
        self.predictor_blocks = nn.ModuleList([
            ACBlock(dim, heads, int(dim * mlp_ratio), attention_backend, layernorm_linear_backend)
            for _ in range(depth)])
        self.predictor_norm = nn.LayerNorm(dim, eps=1e-6)
        self.predictor_proj = nn.Linear(dim, visual_dim)
        self._init_weights(INIT_STD)
        # the layouts of 1 .. num_frames frames from frame 0 (training: teacher forcing and rollout), both
        # token orders, built once here; other shapes (rollouts with a KV cache) are built on first use
        self.layouts = nn.ModuleDict({f"{f}{'p' if permuted else ''}": self._build_layout(0, f, permuted)
                                      for f in range(1, num_frames + 1) for permuted in (False, True)})
        self._extra_layouts: dict = {}

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():  # residual branches of layer l (1-based) scaled by 1 / sqrt(2 l)
            for layer, block in enumerate(self.predictor_blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def _build_layout(self, first_frame: int, num_frames: int, permuted: bool) -> TokenLayout:
        per_frame = COND_TOKENS + self.num_patches
        positions, frame_ids = ac_token_positions(first_frame + num_frames, *self.grid, COND_TOKENS)
        positions, frame_ids = positions[first_frame * per_frame:], frame_ids[first_frame * per_frame:]
        cos, sin = rope_tables(positions, self.head_dim, legacy=self.rope_legacy)  # (N, Dh) fp32
        order = None
        if permuted:
            order = cond_last_order(num_frames, per_frame, COND_TOKENS)
            frame_ids, cos, sin = frame_ids[order], cos[order], sin[order]
        return TokenLayout(frame_ids, cos, sin, order, per_frame, self.head_dim)

    def layout(self, first_frame: int, num_frames: int, device: torch.device, permuted: bool) -> TokenLayout:
        """Frame ids, RoPE tables (and the cond-last permutation) of frames first_frame .. + num_frames - 1:
        one of the layouts built at construction, else built now and kept (per device)."""
        name = f"{num_frames}{'p' if permuted else ''}"
        if first_frame == 0 and name in self.layouts:
            return self.layouts[name]
        key = (first_frame, num_frames, str(device), permuted)
        if key not in self._extra_layouts:  # never evicted: a CUDA graph of a rollout reads them by address
            # (one per step of the longest rollout, each (N, head_dim) RoPE tables and frame ids: kilobytes)
            self._extra_layouts[key] = self._build_layout(first_frame, num_frames, permuted).to(device)
        return self._extra_layouts[key]

    def _check(self, x: torch.Tensor, actions: torch.Tensor, states: torch.Tensor) -> None:
        b, t, p, d = x.shape
        if p != self.num_patches or d != self.visual_dim:
            raise ValueError(f"ACPredictor: features (B, T, P, D) = {tuple(x.shape)} must have P = "
                             f"{self.num_patches} patches and D = {self.visual_dim} (model.encoder and "
                             f"model.encoder_image_size must match the features)")
        if actions.shape[:2] != (b, t) or actions.shape[-1] != self.action_dim:
            raise ValueError(f"ACPredictor: actions {tuple(actions.shape)} must be (B, T, A) = ({b}, {t}, "
                             f"{self.action_dim})")
        if states.shape[:2] != (b, t) or states.shape[-1] != self.state_dim:
            raise ValueError(f"ACPredictor: states {tuple(states.shape)} must be (B, T, S) = ({b}, {t}, "
                             f"{self.state_dim})")

    def forward(self, x: torch.Tensor, actions: torch.Tensor, states: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, P, D_enc), actions (B, T, A), states (B, T, S) -> (B, T, P, D_enc); output t predicts
        frame t + 1. With a cache, x/actions/states are the frames after the cached ones (appended to it)."""
        self._check(x, actions, states)
        b, t, p, _ = x.shape
        tokens = layernorm_linear(x, None, None, self.predictor_embed.weight, self.predictor_embed.bias,
                                  INPUT_LN_EPS, backend=self.ln_backend)  # (B, T, P, d)
        tokens = self.embed_tap(tokens)
        action_tok = self.action_encoder(actions)[:, :, None].to(tokens.dtype)  # (B, T, 1, d)
        state_tok = self.state_encoder(states)[:, :, None].to(tokens.dtype)  # (B, T, 1, d)
        seq = torch.cat([action_tok, state_tok, tokens], dim=2).flatten(1, 2)  # (B, T * N_T, d), interleaved
        first = cache.frames if cache is not None else 0
        permuted = cache is None and attention_backend_for(self.attention_backend, x.device.type, self.head_dim,
                                                           attention_dtype(tokens)) == "triton"
        layout = self.layout(first, t, x.device, permuted)
        if layout.order is not None:
            seq = seq[:, layout.order]  # cond-last: patches of every frame, then the conditioning tokens
        for i, block in enumerate(self.predictor_blocks):
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                seq = checkpoint(block, seq, layout, use_reentrant=False)  # recomputed in the backward pass
            else:
                seq = block(seq, layout, cache, i)
        if cache is not None:
            cache.frames += t
        if layout.order is not None:
            visual = seq[:, :t * p]  # (B, T*P, d), frame-major
        else:
            visual = seq.view(b, t, COND_TOKENS + p, -1)[:, :, COND_TOKENS:].flatten(1, 2)  # (B, T*P, d)
        out = self.predictor_proj(self.predictor_norm(visual))  # (B, T*P, D_enc)
        return out.view(b, t, p, -1)
