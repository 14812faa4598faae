"""ACPredictor (V-JEPA 2-AC): official key layout and parameter count, 3-axis RoPE against written-out
formulas, frame-block causality, backend parity against the fp32 reference model, pure bf16, KV cache."""
import math

import pytest
import torch

from dinowm.models.ac_predictor import ACPredictor, KVCache
from kernels.reference import ac_token_positions, apply_rope_ref, rope_tables

REFERENCE = dict(attention_backend="reference", layernorm_linear_backend="reference")


def small(**kw):
    args = dict(visual_dim=64, action_dim=3, state_dim=2, grid=(2, 3), dim=48, depth=2, heads=2)
    args.update(kw)
    return ACPredictor(**args).eval()


def inputs(b=2, t=4, p=6, d=64, a=3, s=2):
    return torch.randn(b, t, p, d) * 5 + 1, torch.randn(b, t, a), torch.randn(b, t, s)


def rel(x, ref):
    return float((x.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm())


# ----------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------
def test_parameter_count_and_official_keys_at_the_seed_configuration():
    with torch.device("meta"):  # structure only: no memory, no init cost
        p = ACPredictor(visual_dim=1024, action_dim=2, state_dim=2, grid=(16, 16))
    assert sum(t.numel() for t in p.parameters()) == 43_378_048
    shapes = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    expected = {"predictor_embed.weight": (384, 1024), "predictor_embed.bias": (384,),
                "action_encoder.weight": (384, 2), "action_encoder.bias": (384,),
                "state_encoder.weight": (384, 2), "state_encoder.bias": (384,),
                "predictor_norm.weight": (384,), "predictor_norm.bias": (384,),
                "predictor_proj.weight": (1024, 384), "predictor_proj.bias": (1024,)}
    for i in range(24):
        pre = f"predictor_blocks.{i}."
        expected.update({pre + "norm1.weight": (384,), pre + "norm1.bias": (384,),
                         pre + "attn.qkv.weight": (1152, 384), pre + "attn.qkv.bias": (1152,),
                         pre + "attn.proj.weight": (384, 384), pre + "attn.proj.bias": (384,),
                         pre + "norm2.weight": (384,), pre + "norm2.bias": (384,),
                         pre + "mlp.fc1.weight": (1536, 384), pre + "mlp.fc1.bias": (1536,),
                         pre + "mlp.fc2.weight": (384, 1536), pre + "mlp.fc2.bias": (384,)})
    assert shapes == expected


@torch.no_grad()
def test_init_rescales_residual_projections_by_depth():
    torch.manual_seed(1)
    p = ACPredictor(visual_dim=64, action_dim=2, state_dim=2, grid=(4, 4), dim=192, depth=8, heads=4)
    qkv_std = torch.stack([b.attn.qkv.weight.std() for b in p.predictor_blocks])
    assert torch.allclose(qkv_std, torch.full_like(qkv_std, 0.02), rtol=0.05)
    for layer, block in enumerate(p.predictor_blocks, start=1):
        expected = 0.02 / math.sqrt(2 * layer)
        assert abs(float(block.attn.proj.weight.std()) / expected - 1) < 0.1
        assert abs(float(block.mlp.fc2.weight.std()) / expected - 1) < 0.1
        assert float(block.attn.qkv.bias.abs().max()) == 0.0
    assert torch.equal(p.predictor_norm.weight, torch.ones(192))


# ----------------------------------------------------------------------------------------------
# RoPE against written-out formulas
# ----------------------------------------------------------------------------------------------
def rope_written_out(x, pos, head_dim, legacy):
    """x: (N, head_dim), pos: (N, 3) -> rotated, element by element as the formulas read."""
    width = 2 * ((head_dim // 3) // 2)
    out = x.clone().double()
    for n in range(x.shape[0]):
        for axis in range(3):
            base = axis * width
            for j in range(0, width, 2):
                i = j // 2
                if legacy:  # official: angle of element e is pos * w_{e mod D/2}
                    a0 = float(pos[n, axis]) * 10000 ** (-2 * (j % (width // 2)) / width)
                    a1 = float(pos[n, axis]) * 10000 ** (-2 * ((j + 1) % (width // 2)) / width)
                else:
                    a0 = a1 = float(pos[n, axis]) * 10000 ** (-2 * i / width)
                x0, x1 = float(x[n, base + j]), float(x[n, base + j + 1])
                out[n, base + j] = x0 * math.cos(a0) - x1 * math.sin(a0)
                out[n, base + j + 1] = x1 * math.cos(a1) + x0 * math.sin(a1)
    return out


@pytest.mark.parametrize("head_dim", [24, 64, 14])
@pytest.mark.parametrize("legacy", [False, True])
def test_rope_matches_the_written_out_formula(head_dim, legacy):
    pos = torch.randint(0, 16, (9, 3))
    x = torch.randn(9, head_dim, dtype=torch.float64)
    cos, sin = rope_tables(pos, head_dim, legacy=legacy)
    got = apply_rope_ref(x, cos.double(), sin.double())
    torch.testing.assert_close(got, rope_written_out(x, pos, head_dim, legacy), rtol=1e-6, atol=1e-6)
    width = 2 * ((head_dim // 3) // 2)
    assert torch.equal(got[:, 3 * width:], x[:, 3 * width:])  # the tail is not rotated


def test_rope_true_rotation_preserves_norms_and_legacy_does_not():
    pos = torch.randint(1, 16, (32, 3))
    x = torch.randn(32, 24, dtype=torch.float64)
    true = apply_rope_ref(x, *[t.double() for t in rope_tables(pos, 24, legacy=False)])
    legacy = apply_rope_ref(x, *[t.double() for t in rope_tables(pos, 24, legacy=True)])
    torch.testing.assert_close(true.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    assert (legacy.norm(dim=-1) - x.norm(dim=-1)).abs().max() > 1e-3


def test_rope_relative_position_property():
    head_dim = 24
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def dot(pq, pk, legacy=False):
        pos = torch.tensor([pq, pk])
        cos, sin = (t.double() for t in rope_tables(pos, head_dim, legacy=legacy))
        return float(apply_rope_ref(q, cos[0], sin[0]) @ apply_rope_ref(k, cos[1], sin[1]))

    shift = [5, 3, 7]
    a, b = [2, 1, 4], [0, 6, 2]
    moved = lambda p: [u + s for u, s in zip(p, shift)]  # noqa: E731
    assert dot(moved(a), moved(b)) == pytest.approx(dot(a, b), rel=1e-9, abs=1e-9)
    assert dot(moved(a), moved(b), legacy=True) != pytest.approx(dot(a, b, legacy=True), rel=1e-3)


def test_token_positions_conditioning_tokens_on_time_only():
    pos, frames = ac_token_positions(num_frames=3, height=2, width=3, cond_tokens=2)
    assert pos.shape == (24, 3) and frames.tolist() == [t for t in range(3) for _ in range(8)]
    for t in range(3):
        block = pos[t * 8:(t + 1) * 8]
        assert block[:2].tolist() == [[t, 0, 0], [t, 0, 0]]  # action, state: rotated on time only
        assert block[2:].tolist() == [[t, h, w] for h in range(2) for w in range(3)]  # patches row-major


# ----------------------------------------------------------------------------------------------
# mask, parity, dtypes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frame", [1, 2])
def test_frame_block_causal(frame):
    p = small()
    x, a, s = inputs()
    y = p(x, a, s)
    x2, a2, s2 = x.clone(), a.clone(), s.clone()
    x2[:, frame] += torch.randn_like(x2[:, frame])
    a2[:, frame] += 1.0
    s2[:, frame] += 1.0
    y2 = p(x2, a2, s2)
    assert torch.equal(y[:, :frame], y2[:, :frame])  # earlier frames: bit-identical
    assert not torch.allclose(y[:, frame:], y2[:, frame:])
    a3 = a.clone()
    a3[:, frame] += 1.0  # the action alone reaches its own frame's prediction
    assert not torch.allclose(p(x, a3, s)[:, frame], y[:, frame])


def test_cpu_fast_path_matches_the_fp32_reference_model_forward_and_backward():
    p, ref = small(), small(**REFERENCE)
    ref.load_state_dict(p.state_dict())
    x, a, s = inputs()
    x.requires_grad_(True)
    y = p(x, a, s)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref, a, s)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    assert rel(y, y_ref) < 1e-5 and rel(gx, gx_ref) < 1e-5


def test_triton_path_with_cond_last_layout_matches_the_reference_under_the_interpreter():
    pytest.importorskip("triton")
    args = dict(visual_dim=32, action_dim=3, state_dim=2, grid=(2, 2), dim=48, depth=1, heads=2)
    fast = ACPredictor(**args, attention_backend="triton", layernorm_linear_backend="triton")
    ref = ACPredictor(**args, **REFERENCE)
    ref.load_state_dict(fast.state_dict())
    x, a, s = inputs(b=1, t=3, p=4, d=32)
    y = fast(x, a, s)
    assert fast.layout(0, 3, x.device, permuted=True).order is not None  # what it ran on: the permuted layout
    y_ref = ref(x, a, s)
    assert rel(y, y_ref) < 1e-5
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p1), p2 in zip(fast.named_parameters(), ref.parameters()):
        assert rel(p1.grad, p2.grad) < 1e-4, name


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_pure_bf16_model_runs_without_autocast(backend):
    p = small(attention_backend=backend).to(torch.bfloat16)
    ref = small(**REFERENCE)
    ref.load_state_dict({k: v.float() for k, v in p.state_dict().items()})
    x, a, s = (t.to(torch.bfloat16) for t in inputs())
    y = p(x, a, s)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel(y, ref(x.float(), a.float(), s.float())) < 0.05  # bf16 rounding, not a wrong result


def test_layouts_are_built_once_per_shape():
    p = small()
    x, a, s = inputs()
    p(x, a, s)
    p(x, a, s)
    p(x[:, :2], a[:, :2], s[:, :2])
    assert len(p._extra_layouts) == 2  # no layouts built at construction (num_frames 0): two shapes seen
    assert p.layout(0, x.shape[1], x.device, False) is p.layout(0, x.shape[1], x.device, False)
    built = small(num_frames=4)
    assert set(built.layouts) == {f"{f}{o}" for f in range(1, 5) for o in ("", "p")}
    built(x, a, s)
    assert not built._extra_layouts  # the training shapes were built at construction


def test_kv_cache_equals_full_recomputation():
    p = small()
    x, a, s = inputs(t=6)
    full = p(x, a, s)
    cache = KVCache(p.depth)
    parts = [p(x[:, :2], a[:, :2], s[:, :2], cache=cache)]  # prefill two frames, then one at a time
    for t in range(2, 6):
        parts.append(p(x[:, t:t + 1], a[:, t:t + 1], s[:, t:t + 1], cache=cache))
    assert cache.frames == 6
    assert rel(torch.cat(parts, dim=1), full) < 1e-5


@pytest.mark.parametrize("what,shape,match", [
    ("x", (2, 4, 6, 65), "D = 64"), ("x", (2, 4, 5, 64), "P = 6"),
    ("a", (2, 4, 4), r"actions .* \(2, 4, 3\)"), ("s", (2, 4, 3), r"states .* \(2, 4, 2\)"),
])
def test_bad_widths_are_one_line_errors(what, shape, match):
    p = small()
    x, a, s = inputs()
    args = {"x": x, "a": a, "s": s}
    args[what] = torch.randn(shape)
    with pytest.raises(ValueError, match=match) as e:
        p(args["x"], args["a"], args["s"])
    assert "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("legacy", [False, True])
def test_seed_shapes_on_cuda_triton_bf16_against_the_fp32_reference(legacy):
    """B 4, T 6 context frames, 16x16 patches, D_enc 1024, 24 blocks: the Triton path (cond-last layout,
    fused RoPE) under bf16 autocast against the fp32 reference model (three-way tolerance)."""
    args = dict(visual_dim=1024, action_dim=2, state_dim=2, grid=(16, 16), rope_legacy=legacy)
    fast = ACPredictor(**args).cuda()
    ref = ACPredictor(**args, **REFERENCE).cuda()
    ref.load_state_dict(fast.state_dict())
    x, a, s = (t.cuda() for t in inputs(b=4, t=6, p=256, d=1024, a=2, s=2))
    y_ref = ref(x, a, s)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fast(x, a, s)
        y_torch = ref.to(torch.bfloat16)(x.bfloat16(), a.bfloat16(), s.bfloat16())  # same dtype, plain ops
    assert fast.layout(0, 6, x.device, permuted=True).order is not None  # what the Triton path ran on
    err, err_torch = (y.float() - y_ref).abs().max(), (y_torch.float() - y_ref).abs().max()
    assert err <= 2 * err_torch + 1e-3, (float(err), float(err_torch))
