"""DINOv2 ViT-S/14 encoder: official key loading, compat pos-embed interpolation, forward semantics."""
import logging

import pytest
import torch
import torch.nn.functional as F

from dinowm.config import ModelConfig
from dinowm.models.encoder import DinoV2Encoder, EncoderWeightsError, build_encoder, interpolate_pos_embed


def official_state_dict() -> dict:
    """A random state dict with the key names and shapes of dinov2_vits14_pretrain.pth (docs/contract.md §3)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": r(1, 1, 384), "pos_embed": r(1, 1370, 384), "mask_token": r(1, 384),
          "patch_embed.proj.weight": r(384, 3, 14, 14), "patch_embed.proj.bias": r(384)}
    for i in range(12):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": 1 + r(384), b + "norm1.bias": r(384),
            b + "attn.qkv.weight": r(1152, 384), b + "attn.qkv.bias": r(1152),
            b + "attn.proj.weight": r(384, 384), b + "attn.proj.bias": r(384),
            b + "ls1.gamma": 0.1 + r(384),
            b + "norm2.weight": 1 + r(384), b + "norm2.bias": r(384),
            b + "mlp.fc1.weight": r(1536, 384), b + "mlp.fc1.bias": r(1536),
            b + "mlp.fc2.weight": r(384, 1536), b + "mlp.fc2.bias": r(384),
            b + "ls2.gamma": 0.1 + r(384),
        })
    sd.update({"norm.weight": 1 + r(384), "norm.bias": r(384)})
    return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = official_state_dict()
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def loaded(official):
    enc = DinoV2Encoder(image_size=56)
    enc.load_official(official[1])
    return enc


def dinov2_reference(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """DINOv2 forward_features(...)['x_norm_patchtokens'] written out with plain ops."""
    b = images.shape[0]
    g = images.shape[-1] // 14
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["pos_embed"]
    patch = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2), mode="bicubic",
                          scale_factor=((g + 0.1) / 37, (g + 0.1) / 37))
    x = x + torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, g * g, 384)], dim=1)
    n = x.shape[1]
    for i in range(12):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (384,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, n, 3, 6, 64).permute(2, 0, 3, 1, 4)
        att = (qkv[0] * 64 ** -0.5 @ qkv[1].transpose(-1, -2)).softmax(-1)
        h = (att @ qkv[2]).transpose(1, 2).reshape(b, n, 384) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1.gamma"] * h
        h = F.layer_norm(x, (384,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + sd[p + "ls2.gamma"] * h
    return F.layer_norm(x, (384,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 1:]


def test_official_keys_load_and_forward(official, loaded):
    sd, enc = official[0], loaded
    assert set(enc.state_dict()) == set(sd)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k
    images = torch.rand(2, 3, 56, 56) * 2 - 1
    out = enc(images)
    assert out.shape == (2, 16, 384)
    torch.testing.assert_close(out, dinov2_reference(sd, images), rtol=1e-4, atol=1e-4)


def test_resize_to_image_size(loaded):
    enc = loaded
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    resized = F.interpolate(images, size=(56, 56), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(enc(images), enc(resized))


def test_load_errors_name_the_file(official, tmp_path):
    sd, enc = official[0], DinoV2Encoder(image_size=56)
    tiny = {k: torch.zeros(1) for k in sd}  # the official key set with tiny tensors: cheap to save
    missing = dict(tiny)
    del missing["blocks.3.ls1.gamma"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(EncoderWeightsError, match=r"missing\.pth.*blocks\.3\.ls1\.gamma"):
        enc.load_official(tmp_path / "missing.pth")
    torch.save(dict(tiny, register_tokens=torch.zeros(1)), tmp_path / "extra.pth")
    with pytest.raises(EncoderWeightsError, match=r"extra\.pth.*register_tokens"):
        enc.load_official(tmp_path / "extra.pth")
    torch.save(tiny, tmp_path / "wrong.pth")
    with pytest.raises(EncoderWeightsError, match=r"wrong\.pth: shape mismatch.*cls_token \(1,\) \(expected \(1, 1, 384\)\)"):
        enc.load_official(tmp_path / "wrong.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match=r"garbage\.pth"):
        enc.load_official(tmp_path / "garbage.pth")
    with pytest.raises(EncoderWeightsError, match=r"nope\.pth"):
        enc.load_official(tmp_path / "nope.pth")


@pytest.mark.parametrize("grid", [4, 14, 16])
def test_compat_pos_embed_interpolation(grid):
    pos = torch.randn(1, 1370, 384)
    out = interpolate_pos_embed(pos, grid)
    assert out.shape == (1, 1 + grid * grid, 384)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid37 = pos[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    s = (grid + 0.1) / 37
    direct = F.interpolate(grid37, scale_factor=(s, s), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 384)
    torch.testing.assert_close(out[:, 1:], direct, rtol=0, atol=0)
    by_size = F.interpolate(grid37, size=(grid, grid), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 384)
    assert not torch.allclose(out[:, 1:], by_size, atol=1e-3)  # the compat form differs from size=g


def test_frozen_and_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        enc = build_encoder(ModelConfig(encoder_image_size=56))
    assert "RANDOMLY INITIALISED" in caplog.text
    assert enc.grid == 4 and enc.pos_embed.shape == (1, 1370, 384)
    assert not any(p.requires_grad for p in enc.parameters())


def test_build_encoder_loads_weights(official):
    sd, path = official
    enc = build_encoder(ModelConfig(encoder_image_size=56, encoder_weights=str(path)))
    assert torch.equal(enc.pos_embed, sd["pos_embed"])


@pytest.mark.parametrize("variant,width,depth", [("vitb14", 768, 12), ("vitl14", 1024, 24)])
def test_larger_variants_have_the_official_key_layout(variant, width, depth):
    with torch.device("meta"):
        enc = DinoV2Encoder(224, variant)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert enc.emb_dim == width and len(enc.blocks) == depth
    last = f"blocks.{depth - 1}."
    assert shapes["pos_embed"] == (1, 1370, width) and shapes["patch_embed.proj.weight"] == (width, 3, 14, 14)
    assert shapes[last + "attn.qkv.weight"] == (3 * width, width) and shapes[last + "mlp.fc1.weight"] == (4 * width, width)
    assert shapes[last + "ls2.gamma"] == (width,) and shapes["norm.weight"] == (width,)
    assert set(shapes) == {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                           "norm.weight", "norm.bias"} | {f"blocks.{i}.{k}" for i in range(depth) for k in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias", "ls2.gamma")}
