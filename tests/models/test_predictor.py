"""ViTPredictor: original key layout and parameter count, frame-block causality, backend parity."""
import pytest
import torch

from dinowm.models.predictor import ViTPredictor


def small(**kw):
    args = dict(num_patches=4, num_frames=3, dim=404, depth=2, heads=4, dim_head=16, mlp_dim=64, dropout=0.0)
    args.update(kw)
    return ViTPredictor(**args)


def test_parameter_count_and_keys_at_196_patches():
    p = ViTPredictor(num_patches=196, num_frames=3)  # defaults: dim 404, depth 6, 16 x 64 heads, MLP 2048
    assert sum(t.numel() for t in p.parameters()) == 20_122_600
    expected = {"pos_embedding": (1, 588, 404), "transformer.norm.weight": (404,), "transformer.norm.bias": (404,)}
    for i in range(6):
        pre = f"transformer.layers.{i}."
        expected.update({
            pre + "0.norm.weight": (404,), pre + "0.norm.bias": (404,),
            pre + "0.to_qkv.weight": (3072, 404),
            pre + "0.to_out.0.weight": (404, 1024), pre + "0.to_out.0.bias": (404,),
            pre + "1.net.0.weight": (404,), pre + "1.net.0.bias": (404,),
            pre + "1.net.1.weight": (2048, 404), pre + "1.net.1.bias": (2048,),
            pre + "1.net.4.weight": (404, 2048), pre + "1.net.4.bias": (404,),
        })
    assert {k: tuple(v.shape) for k, v in p.state_dict().items()} == expected


def test_output_shape_and_fewer_frames():
    p = small().eval()
    assert p(torch.randn(2, 12, 404)).shape == (2, 12, 404)
    assert p(torch.randn(2, 8, 404)).shape == (2, 8, 404)  # 2 of 3 frames: pos_embedding sliced
    with pytest.raises(ValueError, match="num_patches"):
        p(torch.randn(2, 13, 404))


@pytest.mark.parametrize("k", [1, 2])
def test_frame_block_causal(k):
    p = small().eval()
    x = torch.randn(2, 12, 404)
    y = p(x)
    x2 = x.clone()
    x2[:, 4 * k:4 * (k + 1)] += torch.randn(2, 4, 404)  # perturb frame k
    y2 = p(x2)
    assert torch.equal(y[:, :4 * k], y2[:, :4 * k])  # earlier frames: bit-identical
    assert not torch.allclose(y[:, 4 * k:], y2[:, 4 * k:])  # frame k and later see it


def test_full_attention_inside_a_frame():
    p = small().eval()
    x = torch.randn(1, 12, 404)
    x2 = x.clone()
    x2[:, 3] += 1.0  # last token of frame 0
    assert not torch.allclose(p(x)[:, 0], p(x2)[:, 0])  # the first token of frame 0 sees it


def test_reference_vs_sdpa_fp32():  # "auto" is sdpa on CPU: no separate case
    ref = small(attention_backend="reference", layernorm_linear_backend="reference").eval()
    fast = small(attention_backend="sdpa", layernorm_linear_backend="reference").eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, 404)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_matches_plain_pytorch_definition():
    """The kernel-API model equals the original's math written out with plain ops."""
    p = small(heads=4, dim_head=16).eval()
    x = torch.randn(1, 12, 404)
    sd = p.state_dict()
    h = x + sd["pos_embedding"]
    mask = torch.arange(3).repeat_interleave(4)
    allowed = mask[None, :] <= mask[:, None]
    for i in range(2):
        pre = f"transformer.layers.{i}."
        n = torch.nn.functional.layer_norm(h, (404,), sd[pre + "0.norm.weight"], sd[pre + "0.norm.bias"])
        q, k, v = (n @ sd[pre + "0.to_qkv.weight"].T).chunk(3, dim=-1)
        q, k, v = (t.view(1, 12, 4, 16).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) * 16 ** -0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(1, 12, 64)
        h = h + o @ sd[pre + "0.to_out.0.weight"].T + sd[pre + "0.to_out.0.bias"]
        n = torch.nn.functional.layer_norm(h, (404,), sd[pre + "1.net.0.weight"], sd[pre + "1.net.0.bias"])
        f = torch.nn.functional.gelu(n @ sd[pre + "1.net.1.weight"].T + sd[pre + "1.net.1.bias"])
        h = h + f @ sd[pre + "1.net.4.weight"].T + sd[pre + "1.net.4.bias"]
    h = torch.nn.functional.layer_norm(h, (404,), sd["transformer.norm.weight"], sd["transformer.norm.bias"])
    torch.testing.assert_close(p(x), h, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training():
    p = small(dropout=0.5)
    x = torch.randn(1, 12, 404)
    p.eval()
    assert torch.equal(p(x), p(x))
    p.train()
    assert not torch.equal(p(x), p(x))


# ----------------------------------------------------------------------------------------------
# the model traced whole by torch.compile through the Triton custom ops (interpreter on CPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_model_with_triton_kernels_compiles_fullgraph(compile_backend):
    """Tiled embedding -> ViTPredictor with Triton attention and LN->Linear, compiled with
    fullgraph=True (no graph breaks), matches the eager reference model in outputs and gradients."""
    pytest.importorskip("triton")
    from kernels import tiled_embedding

    torch.manual_seed(0)
    fast = small(num_patches=5, dim=384 + 2 * 8, depth=1, attention_backend="triton",
                 layernorm_linear_backend="triton")
    ref = small(num_patches=5, dim=384 + 2 * 8, depth=1, attention_backend="reference",
                layernorm_linear_backend="reference")
    ref.load_state_dict(fast.state_dict())
    emb = [torch.randn(8, 3), torch.randn(8), torch.randn(8, 45), torch.randn(8)]  # proprio W, b; action W, b
    visual, proprio, action = torch.randn(2, 3, 5, 384), torch.randn(2, 3, 3), torch.randn(2, 3, 45)

    def step(model, backend):
        z = tiled_embedding(visual, proprio, action, *emb, backend=backend)  # (B, 3, 5, 400)
        return model(z.flatten(1, 2))  # (B, 15, 400)

    compiled = torch.compile(lambda: step(fast, "triton"), backend=compile_backend, fullgraph=True)
    out_fast, out_ref = compiled(), step(ref, "reference")
    grad = torch.randn_like(out_ref)
    out_fast.backward(grad)
    out_ref.backward(grad)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-4)
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_default_init_is_the_originals_and_the_copy_init_options():
    torch.manual_seed(0)
    assert small().pos_embedding.std().item() == pytest.approx(1.0, abs=0.05)  # N(0, 1) as the original
    assert small(pos_init_std=0.02).pos_embedding.std().item() == pytest.approx(0.02, rel=0.05)
    # zero-initialised branches and no position embedding: every block is the identity, so the predictor
    # returns its final LayerNorm of the input (with the branches' biases added)
    p = small(pos_init_std=0.0, zero_init_residual=True).eval()
    x = torch.randn(2, 8, 404)
    bias = sum(attn.to_out[0].bias + ff.net[4].bias for attn, ff in p.transformer.layers)
    torch.testing.assert_close(p(x), p.transformer.norm(x + bias), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(small(pos_init_std=0.0).eval()(x), p.transformer.norm(x + bias), atol=1e-2)
