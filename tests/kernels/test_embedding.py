"""Tiled Conv1d(k=1) embedding (kernels/embedding.py) against the fp64 reference.

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py). bf16 only on a GPU (interpreter defect).
"""
import importlib

import pytest
import torch

from _parity import assert_parity
from kernels.reference import tiled_embedding_ref

emb = importlib.import_module("kernels.embedding")

NAMES = ("out", "d_visual", "d_proprio", "d_action", "d_proprio_weight", "d_proprio_bias", "d_action_weight",
         "d_action_bias")


def make_inputs(b, t, p, dv, dp=3, da=45, ep=10, ea=10, dtype=torch.float32, device="cpu"):
    """Fresh random inputs (never zeros), Conv1d-like weight scale."""
    tensors = [
        torch.randn(b, t, p, dv, device=device),
        torch.randn(b, t, dp, device=device),
        torch.randn(b, t, da, device=device),
        torch.randn(ep, dp, device=device) / dp**0.5,
        0.5 * torch.randn(ep, device=device),
        torch.randn(ea, da, device=device) / da**0.5,
        0.5 * torch.randn(ea, device=device),
    ]
    return [x.to(dtype) for x in tensors]


def run(fn, inputs, dy):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, dy))


def check_all(inputs, dtype):
    out_shape = (*inputs[0].shape[:3], inputs[0].shape[3] + inputs[3].shape[0] + inputs[5].shape[0])
    dy = torch.randn(out_shape, device=inputs[0].device).to(dtype)
    fast = run(emb.tiled_embedding_triton, inputs, dy)
    ref = run(tiled_embedding_ref, [x.double() for x in inputs], dy.double())
    same = run(tiled_embedding_ref, inputs, dy) if dtype != torch.float32 else [None] * len(NAMES)
    for name, f, r, s in zip(NAMES, fast, ref, same):
        assert f.dtype == dtype and f.shape == r.shape, name
        # the visual part is a copy and its gradient a slice: exact in every dtype
        floor = 0.0 if name == "d_visual" else None
        assert_parity(f, r, s, factor=2.0 if name == "out" else 3.0, floor=floor, name=f"{name} {dtype}")


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------
SHAPES = [  # (B, T, P, Dv, Dp, Da, Ep, Ea)
    (1, 1, 1, 5, 3, 45, 10, 10),  # a single patch
    (2, 3, 37, 384, 3, 45, 10, 10),  # DINO-WM widths, prime patch count (partial tile)
    (1, 2, 70, 130, 3, 45, 10, 10),  # Dv not a multiple of the copy block
    (2, 4, 16, 256, 2, 2, 128, 256),  # wide embeddings (the limit is 256), tiny inputs
    (3, 1, 29, 64, 7, 13, 5, 11),  # unequal, odd embedding widths
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_parity(shape, dtype):
    b, t, p, dv, dp, da, ep, ea = shape
    check_all(make_inputs(b, t, p, dv, dp, da, ep, ea, dtype=dtype), dtype)


# ----------------------------------------------------------------------------------------------
# unwritten elements, determinism, gradcheck
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so unwritten elements show up."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(emb.torch, "empty", poisoned_empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_poisoned_buffers(poisoned, dtype):
    visual, proprio, action, wp, bp, wa, ba = make_inputs(2, 3, 41, 384, dtype=dtype)
    out = emb.tiled_embedding_fwd(visual, proprio, action, wp, bp, wa, ba)
    grads = emb.tiled_embedding_bwd(torch.randn_like(out), proprio, action, wp, wa, 384)
    for name, x in zip(("out", "d_proprio", "d_action", "dpe", "dae"), (out,) + grads):
        assert torch.isfinite(x).all(), f"{name}: {int((~torch.isfinite(x)).sum())} unwritten/non-finite elements"


def test_backward_is_deterministic():
    inputs = make_inputs(2, 4, 150, 96)
    dy = torch.randn(2, 4, 150, 116)
    first, second = run(emb.tiled_embedding_triton, inputs, dy), run(emb.tiled_embedding_triton, inputs, dy)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


def test_gradcheck_fp64():
    inputs = [x.requires_grad_() for x in make_inputs(1, 2, 3, 2, dp=2, da=3, ep=2, ea=3, dtype=torch.float64)]
    assert torch.autograd.gradcheck(emb.tiled_embedding_triton, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# torch.compile through the custom op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    inputs = make_inputs(2, 3, 9, 32)

    def step(*args):
        return emb.tiled_embedding_triton(*args).tanh().square().mean()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in inputs]
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [x.double().requires_grad_() for x in inputs]
    ref = tiled_embedding_ref(*ref_leaves).tanh().square().mean()
    ref.backward()
    assert_parity(loss, ref, name="loss")
    for name, a, r in zip(NAMES[1:], leaves, ref_leaves):
        assert_parity(a.grad, r.grad, name=name)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def test_launcher_validates():
    visual, proprio, action, wp, bp, wa, ba = make_inputs(2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"visual must be \(B, T, P, Dv\)"):
        emb.tiled_embedding_triton(visual[:1], proprio, action, wp, bp, wa, ba)
    with pytest.raises(ValueError, match="must share"):
        emb.tiled_embedding_triton(visual, proprio, action[:, :2], wp, bp, wa, ba)
    with pytest.raises(ValueError, match=r"proprio_weight must be \(E, 3\)"):
        emb.tiled_embedding_triton(visual, proprio, action, wp[:, :2], bp, wa, ba)
    with pytest.raises(ValueError, match=r"action_bias must be \(10,\)"):
        emb.tiled_embedding_triton(visual, proprio, action, wp, bp, wa, ba[:4])
    with pytest.raises(TypeError, match="not supported"):
        emb.tiled_embedding_triton(visual.int(), proprio, action, wp, bp, wa, ba)
    with pytest.raises(ValueError, match=r"visual must be \(B, T, P, Dv\)"):
        emb.tiled_embedding_triton(visual[0], proprio, action, wp, bp, wa, ba)


def test_non_contiguous_visual():
    inputs = make_inputs(2, 3, 6, 16)
    inputs[0] = torch.randn(2, 3, 16, 6).transpose(-1, -2)  # (B, T, P, Dv), last dim strided
    out = emb.tiled_embedding_triton(*inputs)
    assert_parity(out, tiled_embedding_ref(*[x.double() for x in inputs]), name="out")


def test_bf16_under_the_interpreter():
    """No bf16 arithmetic happens in the kernels (loads are upcast at once), so the interpreter's bf16
    defect does not bite; the GPU test below covers the compiled path."""
    check_all(make_inputs(2, 2, 19, 64, dtype=torch.bfloat16), torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_real_shapes_cuda(dtype):
    check_all(make_inputs(32, 4, 256, 384, dtype=dtype, device="cuda"), dtype)
