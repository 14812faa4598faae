"""VQ-VAE decoder (quantisation off): shapes, the original key layout, ResBlock semantics."""
import torch
import torch.nn.functional as F

from dinowm.models.decoder import VQVAEDecoder


def test_output_shape_and_keys():
    dec = VQVAEDecoder()
    assert dec(torch.randn(2, 384, 2, 2)).shape == (2, 3, 32, 32)  # 16x upsampling
    shapes = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    for part, out in (("upsample_b", 384), ("dec", 3)):
        assert shapes[f"{part}.blocks.0.weight"] == (384, 384, 3, 3)
        for i in range(1, 5):
            assert shapes[f"{part}.blocks.{i}.conv.1.weight"] == (128, 384, 3, 3)
            assert shapes[f"{part}.blocks.{i}.conv.3.weight"] == (384, 128, 1, 1)
        assert shapes[f"{part}.blocks.6.weight"] == (384, 192, 4, 4)
        assert shapes[f"{part}.blocks.8.weight"] == (192, out, 4, 4)
    assert {"quantize_b.embed", "quantize_b.cluster_size", "quantize_b.embed_avg"} <= set(shapes)
    # the codebook is buffers only: no trainable parameter outside upsample_b / dec
    assert all(n.startswith(("upsample_b.", "dec.")) for n, _ in dec.named_parameters())


def test_resblock_and_no_output_activation():
    dec = VQVAEDecoder(emb_dim=8, channel=16, n_res_block=1, n_res_channel=4, n_embed=4)
    x = torch.randn(1, 16, 3, 3)
    block = dec.dec.blocks[1]
    c1, c3 = block.conv[1], block.conv[3]
    expected = x + F.conv2d(F.relu(F.conv2d(F.relu(x), c1.weight, c1.bias, padding=1)), c3.weight, c3.bias)
    torch.testing.assert_close(block(x), expected)
    out = dec(torch.randn(4, 8, 2, 2))
    assert out.shape == (4, 3, 32, 32) and (out < 0).any()  # no output activation
