"""The feature cache: fp32 is the encoder's output, bf16 rounds each feature once (relative error <= 2^-8)."""
import torch

from dinowm.data.cache import FeatureCache
from dinowm.data.windows import preprocess_images
from dinowm.models.encoder import DinoV2Encoder


class TinyEncoderModel(torch.nn.Module):
    """The part of a world model the cache calls: encode_visual (B, T, 3, S, S) -> (B, T, P, D)."""

    def __init__(self):
        super().__init__()
        self.encoder = DinoV2Encoder(image_size=28)  # 2x2 patches

    def encode_visual(self, obs):
        return self.encoder(obs.flatten(0, 1)).unflatten(0, obs.shape[:2])


def _frames(n=10):
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_fp32_cache_is_the_encoder_output_and_bf16_is_within_its_rounding():
    model, frames = TinyEncoderModel().eval(), _frames()
    cpu = torch.device("cpu")
    fp32 = FeatureCache(model, frames, 28, cpu, torch.float32, chunk=4, progress=False)
    bf16 = FeatureCache(model, frames, 28, cpu, torch.float32, chunk=4, progress=False, store_dtype=torch.bfloat16)
    idx = torch.tensor([[9, 0, 3], [4, 4, 7]])  # (B, T), crossing chunk boundaries
    with torch.no_grad():
        direct = model.encode_visual(preprocess_images(frames[idx], 28))  # (B, T, P, D), recomputed
    exact = fp32[idx]
    # the same function on another batch shape: fp32 matmuls may round the last bits differently
    torch.testing.assert_close(exact, direct, rtol=1e-5, atol=1e-5)
    rounded = bf16[idx]
    assert rounded.dtype == torch.float32 and bf16.nbytes * 2 == fp32.nbytes
    rel = ((rounded - exact).abs() / exact.abs().clamp_min(1e-30)).max()
    assert 0 < rel <= 2.0**-8, rel  # round to nearest with 8 significant bits
