"""Fused LayerNorm -> Linear (kernels/ln_linear.py) against the fp64 reference.

Runs on CPU under TRITON_INTERPRET=1 (tests/conftest.py). bf16 only on a GPU (interpreter defect).
"""

import pytest
import torch

from _parity import assert_parity
from kernels.reference import layernorm_linear_ref

from kernels import ln_linear as lnl
from kernels.common import interpreting

NAMES = ("y", "dx", "dgamma", "dbeta", "dW", "db")


def make_inputs(lead, k, n, dtype, affine=True, bias=True, device="cpu"):
    """Fresh random inputs (never zeros): x with a row offset so mean subtraction matters."""
    x = torch.randn(*lead, k, device=device) * 1.5 + torch.randn(*lead, 1, device=device)
    gamma = 1.0 + 0.5 * torch.randn(k, device=device) if affine else None
    beta = 0.3 * torch.randn(k, device=device) if affine else None
    w = torch.randn(n, k, device=device) / k**0.5
    b = 0.5 * torch.randn(n, device=device) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)
    return [cast(t) for t in (x, gamma, beta, w, b)]


def run(fn, inputs, dy, eps):
    """Forward and every gradient (None where the input is None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves, eps)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, dy))
    return [y] + [None if t is None else next(grads) for t in leaves]


def check_all(inputs, eps, dtype):
    dy = torch.randn(*inputs[0].shape[:-1], inputs[3].shape[0], device=inputs[0].device).to(dtype)
    fast = run(lnl.layernorm_linear_triton, inputs, dy, eps)
    ref = run(layernorm_linear_ref, [None if t is None else t.double() for t in inputs], dy.double(), eps)
    same = run(layernorm_linear_ref, inputs, dy, eps) if dtype != torch.float32 else [None] * 6
    for name, f, r, s in zip(NAMES, fast, ref, same):
        if r is None:
            assert f is None, name
            continue
        assert f.dtype == dtype and f.shape == r.shape, name
        assert_parity(f, r, s, factor=2.0 if name == "y" else 3.0, name=f"{name} {dtype}")


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------
SHAPES = [  # (leading dims, K, N, eps)
    ((1,), 404, 64, 1e-5),  # a single row, DINO-WM width
    ((37,), 404, 96, 1e-5),  # prime row count
    ((2, 3, 7), 384, 72, 1e-6),  # AC predictor width and eps, 3-d leading shape
    ((1152,), 404, 40, 1e-5),  # many rows: several row blocks, a partial last one
    ((53,), 1152, 33, 1e-5),  # wide K, prime M and N
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead,k,n,eps", SHAPES, ids=[f"{s[0]}x{s[1]}->{s[2]}" for s in SHAPES])
def test_parity_shapes(lead, k, n, eps, dtype):
    check_all(make_inputs(lead, k, n, dtype), eps, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_parity_options(affine, bias, dtype):
    check_all(make_inputs((29,), 404, 48, dtype, affine=affine, bias=bias), 1e-5, dtype)


def test_ln_weight_only():
    x, gamma, _beta, w, b = make_inputs((13,), 100, 20, torch.float32)
    check_all([x, gamma, None, w, b], 1e-5, torch.float32)


def test_large_mean_small_variance():
    """One-pass statistics must not cancel for rows with |mean| >> std: no worse than PyTorch's fp32."""
    x, gamma, beta, w, b = make_inputs((17,), 404, 24, torch.float32)
    x = (1000.0 + 0.01 * x).float()
    y, mean, rstd = lnl.layernorm_linear_fwd(x, gamma, beta, w, b, 1e-5)
    _, mean_torch, rstd_torch = torch.ops.aten.native_layer_norm(x, (404,), None, None, 1e-5)
    xd = x.double()
    assert_parity(mean, xd.mean(-1), mean_torch.flatten(), floor=1e-6, name="mean")
    assert_parity(rstd, (xd.var(-1, unbiased=False) + 1e-5).rsqrt(), rstd_torch.flatten(), floor=1e-3, name="rstd")
    args64 = [t.double() for t in (gamma, beta, w, b)]
    assert_parity(y, layernorm_linear_ref(xd, *args64, 1e-5), layernorm_linear_ref(x, gamma, beta, w, b, 1e-5),
                  floor=1e-4, name="y")


# ----------------------------------------------------------------------------------------------
# unwritten elements, determinism, gradcheck
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so unwritten elements show up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(lnl.torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(lnl.torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_poisoned_buffers(poisoned, dtype):
    x, gamma, beta, w, b = make_inputs((67,), 404, 130, dtype)
    y, mean, rstd = lnl.layernorm_linear_fwd(x, gamma, beta, w, b, 1e-5)
    dy = torch.randn_like(y)
    grads = lnl.layernorm_linear_bwd(dy, x, gamma, beta, w, b, mean, rstd)
    for name, t in zip(("y", "mean", "rstd") + NAMES[1:], (y, mean, rstd) + grads):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} unwritten/non-finite elements"
    assert mean.dtype == rstd.dtype == torch.float32


def test_backward_is_deterministic():
    inputs = make_inputs((300,), 404, 70, torch.float32)
    dy = torch.randn(300, 70)
    first = run(lnl.layernorm_linear_triton, inputs, dy, 1e-5)
    second = run(lnl.layernorm_linear_triton, inputs, dy, 1e-5)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("affine,bias", [(True, True), (False, False)], ids=["affine_bias", "plain"])
def test_gradcheck_fp64(affine, bias):
    x, gamma, beta, w, b = make_inputs((3,), 10, 5, torch.float64, affine=affine, bias=bias)
    inputs = [t.requires_grad_() for t in (x, gamma, beta, w, b) if t is not None]

    def fn(*args):
        it = iter(args)
        x_, g_, b_, w_, bb_ = (None if t is None else next(it) for t in (x, gamma, beta, w, b))
        return lnl.layernorm_linear_triton(x_, g_, b_, w_, bb_, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# torch.compile through the custom op
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    inputs = make_inputs((2, 9), 404, 24, torch.float32)

    def step(x, gamma, beta, w, b):
        return torch.nn.functional.gelu(lnl.layernorm_linear_triton(x, gamma, beta, w, b, 1e-5)).square().mean()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in inputs]
    ref = torch.nn.functional.gelu(layernorm_linear_ref(*ref_leaves, 1e-5)).square().mean()
    ref.backward()
    assert_parity(loss, ref, name="loss")
    for name, a, r in zip(NAMES[1:], leaves, ref_leaves):
        assert_parity(a.grad, r.grad, name=name)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def test_launcher_validates():
    x, gamma, beta, w, b = make_inputs((4,), 16, 8, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(N, 16\)"):
        lnl.layernorm_linear_triton(x, gamma, beta, w[:, :15], b)
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        lnl.layernorm_linear_triton(x, gamma[:5], beta, w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        lnl.layernorm_linear_triton(x, gamma, beta, w, b[:3])
    with pytest.raises(TypeError, match="bias dtype torch.float32 differs from weight dtype"):
        lnl.layernorm_linear_triton(x, gamma, beta, w.half(), b)
    with pytest.raises(TypeError, match="mixed precision takes fp32 x"):
        lnl.layernorm_linear_triton(x.half(), gamma.half(), beta.half(), w, b)
    with pytest.raises(TypeError, match="mixed precision takes fp32 x"):
        lnl.layernorm_linear_triton(x, gamma, beta, w.double(), b.double())
    with pytest.raises(TypeError, match="only fp32 LayerNorm parameters"):
        lnl.layernorm_linear_triton(x, gamma.half(), beta, w.half(), b.half())
    with pytest.raises(TypeError, match="only fp32 LayerNorm parameters"):
        lnl.layernorm_linear_triton(x.half(), gamma.double(), None, w.half(), b.half())
    with pytest.raises(TypeError, match="not supported"):
        lnl.layernorm_linear_triton(x.int(), None, None, w.int(), None)


def test_non_contiguous_input():
    x, gamma, beta, w, b = make_inputs((12,), 128, 16, torch.float32)
    x_t = torch.randn(128, 12).t()  # (12, 128) with stride (1, 12)
    w_t = torch.randn(128, 16).t()
    y = lnl.layernorm_linear_triton(x_t, gamma, beta, w_t, b)
    assert_parity(y, layernorm_linear_ref(x_t.double(), gamma.double(), beta.double(), w_t.double(), b.double()),
                  name="y")


def test_bf16_under_the_interpreter():
    """bf16 arithmetic is broken in the interpreter: the launcher runs the dots in fp32 there and every
    load is upcast at once, so the CPU path still matches (the tensor-core bf16 path is GPU-only)."""
    if not interpreting():
        pytest.skip("interpreter-only path")
    check_all(make_inputs((21,), 404, 40, torch.bfloat16), 1e-5, torch.bfloat16)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=["x_fp32", "x_fp16"])
def test_autocast_layernorm_in_fp32(x_dtype):
    """Under autocast the LayerNorm runs in fp32 from x as given and only its output is rounded for the
    GEMM, like F.linear(F.layer_norm(x)) under autocast. Rows with mean 50 and std 1 expose a launcher
    that rounds x to the autocast dtype first (fp16 spacing at 50 is 1/32: ~20x the reference's error).
    fp16 autocast: bf16 arithmetic is broken in the interpreter. Output in the autocast dtype, gradients
    in each input's dtype, all within the parity rule of the same computation in PyTorch."""
    k, n = 404, 40
    x = 50.0 + torch.randn(19, k)
    gamma, beta = 1.0 + 0.5 * torch.randn(k), 0.3 * torch.randn(k)
    w, b = torch.randn(n, k) / k**0.5, 0.5 * torch.randn(n)
    inputs = [x.to(x_dtype), gamma, beta, w, b]

    def torch_fn(x_, g_, b_, w_, bb_, eps):
        return torch.nn.functional.linear(torch.nn.functional.layer_norm(x_, (k,), g_, b_, eps), w_, bb_)

    with torch.autocast("cpu", dtype=torch.float16):
        y = lnl.layernorm_linear_triton(*[t.clone() for t in inputs], 1e-5)
        assert y.dtype == torch_fn(*inputs, 1e-5).dtype == torch.float16
        dy = torch.randn_like(y)
        fast = run(lnl.layernorm_linear_triton, inputs, dy, 1e-5)
        same = run(torch_fn, inputs, dy, 1e-5)
    ref = run(layernorm_linear_ref, [t.double() for t in inputs], dy.double(), 1e-5)
    assert fast[0].dtype == torch.float16
    assert [g.dtype for g in fast[1:]] == [t.dtype for t in inputs]
    for name, f, r, s in zip(NAMES, fast, ref, same):
        assert_parity(f, r, s, factor=2.0 if name == "y" else 3.0, name=f"{name} autocast")


def test_mixed_dtypes_without_autocast():
    """The autocast mix called directly (fp32 x, gamma, beta; fp16 W, b) gives the same as under autocast."""
    x, gamma, beta, w, b = make_inputs((23,), 404, 40, torch.float32)
    w16, b16 = w.half(), b.half()
    y = lnl.layernorm_linear_triton(x, gamma, beta, w16, b16)
    with torch.autocast("cpu", dtype=torch.float16):
        y_autocast = lnl.layernorm_linear_triton(x, gamma, beta, w, b)
    assert y.dtype == torch.float16 and torch.equal(y, y_autocast)


# ----------------------------------------------------------------------------------------------
# GPU only
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("lead,k,n,eps", [((3 * 256,), 404, 3072, 1e-5), ((2 * 1806,), 384, 1152, 1e-6)])
def test_bf16_cuda(lead, k, n, eps):
    check_all(make_inputs(lead, k, n, torch.bfloat16, device="cuda"), eps, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_real_shapes_cuda(dtype):
    check_all(make_inputs((32 * 3 * 256 // 8,), 404, 2048, dtype, device="cuda"), 1e-5, dtype)
