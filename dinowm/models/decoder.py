"""VQ-VAE decoder with quantisation off (docs/contract.md §6): DINO patch features -> image, 16x upsampling.

    z: (N, 384, g, g)
    upsample_b: Conv3x3(384->384), 4 ResBlocks, ReLU, ConvT(384->192, k4 s2 p1), ReLU, ConvT(192->384, k4 s2 p1)
                -> (N, 384, 4g, 4g)
    dec:        Conv3x3(384->384), 4 ResBlocks, ReLU, ConvT(384->192, k4 s2 p1), ReLU, ConvT(192->3, k4 s2 p1)
                -> (N, 3, 16g, 16g)            (224 for g = 14, 256 for g = 16); no output activation
    ResBlock(x) = x + Conv1x1(128->384)(ReLU(Conv3x3(384->128)(ReLU(x))))

Key layout of the original (docs/contract.md §10): `upsample_b.blocks.{0, 1..4 (.conv.1, .conv.3), 6, 8}`, the
same under `dec.blocks`, and the codebook buffers `quantize_b.{embed, cluster_size, embed_avg}`, which
exist only so original checkpoints load; they are never used (quantisation is off).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class ResBlock(nn.Module):
    def __init__(self, channel: int, res_channel: int):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(channel, res_channel, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(res_channel, channel, 1))

    def forward(self, x):
        return x + self.conv(x)


class Decoder(nn.Module):
    """(N, in_channel, h, w) -> (N, out_channel, 4h, 4w)."""

    def __init__(self, in_channel: int, out_channel: int, channel: int, n_res_block: int, n_res_channel: int):
        super().__init__()
        blocks = [nn.Conv2d(in_channel, channel, 3, padding=1)]
        blocks += [ResBlock(channel, n_res_channel) for _ in range(n_res_block)]
        blocks += [
            nn.ReLU(),
            nn.ConvTranspose2d(channel, channel // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channel // 2, out_channel, 4, stride=2, padding=1),
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class Quantize(nn.Module):
    """Codebook buffers of the original VQ-VAE; kept only for checkpoint compatibility (unused)."""

    def __init__(self, dim: int, n_embed: int):
        super().__init__()
        embed = torch.randn(dim, n_embed)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", embed.clone())


class VQVAEDecoder(nn.Module):
    """z: (N, emb_dim, g, g) -> images (N, in_channel, 16g, 16g)."""

    def __init__(self, emb_dim: int = 384, in_channel: int = 3, channel: int = 384, n_res_block: int = 4,
                 n_res_channel: int = 128, n_embed: int = 2048):
        super().__init__()
        self.emb_dim = emb_dim
        self.quantize_b = Quantize(emb_dim, n_embed)
        self.upsample_b = Decoder(emb_dim, emb_dim, channel, n_res_block, n_res_channel)
        self.dec = Decoder(emb_dim, in_channel, channel, n_res_block, n_res_channel)

    # Execution choices (not parameters; `dinowm.perf.configure` sets them for the machine at hand): the
    # layout of the convolutions' activations, and whether they run in fp32 under a bf16 autocast (on a CPU
    # without bf16 instructions, bf16 convolutions are emulated and slower than fp32).
    channels_last: bool = False
    fp32_convs: bool = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # NHWC activations: the layout cuDNN's and oneDNN's fast convolutions work in
            z = z.contiguous(memory_format=torch.channels_last)
        if self.fp32_convs:
            with torch.autocast(z.device.type, enabled=False):
                return self.dec(self.upsample_b(z.float()))
        return self.dec(self.upsample_b(z))  # (N, 384, 4g, 4g) -> (N, 3, 16g, 16g)
