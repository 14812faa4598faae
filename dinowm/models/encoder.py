"""DINOv2 ViT/14 image encoder (frozen), our own definition with the official parameter names.

Architecture (docs/contract.md §3, official `dinov2_vits14`): patch 14, width 384, depth 12, 6 heads, MLP 1536
(exact GELU), qkv with bias, LayerScale on both residual branches (`ls1.gamma`, `ls2.gamma`),
pre-norm, LayerNorm eps 1e-6, a cls token, no register tokens, a final `norm`. The official
`dinov2_vitb14` (768 wide, 12 heads) and `dinov2_vitl14` (1024 wide, depth 24, 16 heads) have the same
layout and key names with other sizes (`VARIANTS`); all use MLP 4x width.

    images (B, 3, S, S) in [-1, 1]
      -> resize to image_size (bilinear, antialias) if S != image_size
      -> patch_embed (B, g*g, 384), g = image_size // 14, prepend cls -> (B, 1 + g*g, 384)
      -> + pos_embed (37x37 grid of the official 518 px model, bicubic-interpolated to g x g)
      -> 12 blocks: x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x)))
      -> norm(x)[:, 1:]  = x_norm_patchtokens  (B, g*g, 384), patches row-major

compat (docs/contract.md §3): the positional embedding is interpolated exactly as the official code does, with
`scale_factor = (g + 0.1) / 37` instead of `size = g` (the two differ noticeably).

The encoder is frozen (requires_grad False) and deterministic, so its output per frame may be cached.
No ImageNet mean/std: the input is the [-1, 1] image, as in the original DINO-WM.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinowm.errors import UserError

log = logging.getLogger("dinowm.models")


class EncoderWeightsError(UserError, ValueError):
    """model.encoder_weights names a file that is missing or not the official ViT-S/14 state dict."""

PATCH_SIZE = 14
WIDTH = 384
DEPTH = 12
HEADS = 6
MLP_DIM = 1536
VARIANTS = {  # name: (width, depth, heads); MLP 4 * width
    "vits14": (384, 12, 6),
    "vitb14": (768, 12, 12),
    "vitl14": (1024, 24, 16),
}
OFFICIAL_GRID = 37  # the official checkpoint was trained at 518 px: 37 x 37 patches
INTERPOLATE_OFFSET = 0.1  # compat: the official "historical kludge" in interpolate_pos_encoding


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize an official (1, 1 + M*M, D) positional embedding to a grid x grid patch grid.

    compat: bicubic with scale_factor (grid + 0.1) / M (not size=grid), no antialias, as the
    official DINOv2 code. Returns (1, 1 + grid*grid, D) in pos_embed's dtype.
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    assert m * m == n, f"pos_embed has {n} patch positions, not a square grid"
    if grid == m:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed.float()[:, 1:]
    d = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, m, m, d).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = (grid + INTERPOLATE_OFFSET) / m
    patch_pos = F.interpolate(patch_pos, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert patch_pos.shape[-2:] == (grid, grid), f"interpolated pos_embed has grid {tuple(patch_pos.shape[-2:])}"
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, d)  # (1, g*g, D)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = PATCH_SIZE, in_chans: int = 3, dim: int = WIDTH):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, S, S) -> (B, g*g, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    """Full self-attention (F.scaled_dot_product_attention), qkv with bias."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, N, D)
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int = WIDTH, hidden: int = MLP_DIM):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int = WIDTH, heads: int = HEADS, mlp_dim: int = MLP_DIM):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2 ViT/14 (default ViT-S/14). forward: images (B, 3, S, S) in [-1, 1] -> patch tokens
    (B, g*g, emb_dim), emb_dim 384 / 768 / 1024 for vits14 / vitb14 / vitl14."""

    patch_size = PATCH_SIZE

    def __init__(self, image_size: int = 224, variant: str = "vits14"):
        super().__init__()
        if image_size % PATCH_SIZE != 0:
            raise ValueError(f"encoder image_size {image_size} is not a multiple of the patch size {PATCH_SIZE}")
        if variant not in VARIANTS:
            raise ValueError(f"encoder variant {variant!r} unknown; choose one of {', '.join(VARIANTS)}")
        width, depth, heads = VARIANTS[variant]
        self.variant = variant
        self.emb_dim = width
        self.image_size = image_size
        self.grid = image_size // PATCH_SIZE
        self.num_patches = self.grid * self.grid
        # parameter names and shapes are those of the official checkpoint (docs/contract.md §3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + OFFICIAL_GRID * OFFICIAL_GRID, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width))  # unused (masked-image training only)
        self.patch_embed = PatchEmbed(dim=width)
        self.blocks = nn.ModuleList([Block(width, heads, 4 * width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self._init_weights()
        self.requires_grad_(False)

    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def load_official(self, path) -> None:
        """Load the official `dinov2_<variant>_pretrain.pth` state dict (strict; exact official keys)."""
        path = Path(path)
        if not path.is_file():
            raise EncoderWeightsError(f"{path}: DINOv2 encoder weights not found (model.encoder_weights)")
        try:  # weights_only: a crafted file cannot run code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file for the user
            detail = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line),
                          (str(e).splitlines() or [""])[0])
            raise EncoderWeightsError(f"{path}: not a readable DINOv2 state dict ({type(e).__name__}: "
                                      f"{detail[:200]})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EncoderWeightsError(f"{path}: expected a state dict of tensors (dinov2_{self.variant}_pretrain.pth), "
                             f"got {type(state).__name__}")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise EncoderWeightsError(f"{path}: not a DINOv2 {self.variant} checkpoint: missing keys {_short(missing)}, "
                             f"unexpected keys {_short(unexpected)}")
        wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in own.items()
                 if state[k].shape != v.shape]
        if wrong:
            raise EncoderWeightsError(f"{path}: shape mismatch, not DINOv2 {self.variant} (model.encoder): {_short(wrong)}")
        self.load_state_dict(state, strict=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, S, S) in [-1, 1] -> normalised patch tokens (B, g*g, emb_dim)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        x = self.patch_embed(images)  # (B, g*g, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + g*g, D)
        x = x + interpolate_pos_embed(self.pos_embed, self.grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]  # (B, g*g, D)


def _short(items, n: int = 5) -> str:
    if not items:
        return "none"
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def build_encoder(model_cfg) -> DinoV2Encoder:
    """The frozen encoder of model_cfg: official weights from model_cfg.encoder_weights, else random (warned)."""
    encoder = DinoV2Encoder(model_cfg.encoder_image_size, model_cfg.encoder)
    if model_cfg.encoder_weights:
        encoder.load_official(model_cfg.encoder_weights)
        log.info("encoder: DINOv2 %s weights loaded from %s", model_cfg.encoder, model_cfg.encoder_weights)
    else:
        msg = ("model.encoder_weights is empty: the DINOv2 encoder is RANDOMLY INITIALISED "
               f"(set it to a local dinov2_{model_cfg.encoder}_pretrain.pth for meaningful features)")
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return encoder
