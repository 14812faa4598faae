"""FLOP formulas of the custom ops for torch.utils.flop_counter.FlopCounterMode (what
dinowm.metrics.count_step_flops measures), against the analytic counts on small shapes.

Triton ops run under TRITON_INTERPRET=1 (tests/conftest.py). Conventions: GEMM = 2 * M * K * N;
attention forward = 4 * B * H * D * allowed (allowed: score entries (i, j) with frame(j) <= frame(i)),
backward 2.5x the forward; elementwise work and reductions are not counted (as in torch's formulas).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels import attention, dispatch, embedding, flops, reference
from kernels import ln_linear as lnl


def count(fn, *tensors, backward=False):
    """Total FLOPs of fn(*tensors) (and of its backward with a random upstream gradient)."""
    leaves = [t.detach().clone().requires_grad_(backward) for t in tensors]
    with FlopCounterMode(display=False) as counter:
        out = fn(*leaves)
        if backward:
            torch.autograd.grad(out, leaves, torch.randn_like(out))
    return counter.get_total_flops()


def brute_force_allowed(frame_ids: torch.Tensor) -> int:
    return int((frame_ids[None, :] <= frame_ids[:, None]).sum())


# ----------------------------------------------------------------------------------------------
# fused LayerNorm -> Linear
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layernorm_linear(affine):
    (m1, m2), k, n = (3, 7), 40, 24
    x = torch.randn(m1, m2, k) + 2.0
    w, b = torch.randn(n, k) / k**0.5, torch.randn(n)
    gamma, beta = (1.0 + 0.1 * torch.randn(k), 0.1 * torch.randn(k)) if affine else (None, None)
    gemm = 2 * m1 * m2 * k * n

    def fn(x_, w_, b_):
        return lnl.layernorm_linear_triton(x_, gamma, beta, w_, b_)

    assert count(fn, x, w, b) == gemm
    assert count(fn, x, w, b, backward=True) == 3 * gemm  # + dx GEMM + dW GEMM


def test_layernorm_linear_under_autocast():
    x, w = torch.randn(13, 32) + 50.0, torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        flops = count(lambda x_, w_: lnl.layernorm_linear_triton(x_, None, None, w_, None), x, w, backward=True)
    assert flops == 3 * 2 * 13 * 32 * 16


# ----------------------------------------------------------------------------------------------
# tiled embedding
# ----------------------------------------------------------------------------------------------
def test_tiled_embedding():
    b, t, p, dv, dp, da, ep, ea = 2, 3, 5, 8, 3, 7, 6, 4
    visual, proprio, action = torch.randn(b, t, p, dv), torch.randn(b, t, dp), torch.randn(b, t, da)
    wp, bp, wa, ba = torch.randn(ep, dp), torch.randn(ep), torch.randn(ea, da), torch.randn(ea)
    gemms = 2 * b * t * (ep * dp + ea * da)  # per frame, not per patch

    def fn(visual_, proprio_, action_, wp_, wa_):
        return embedding.tiled_embedding_triton(visual_, proprio_, action_, wp_, bp, wa_, ba)

    assert count(fn, visual, proprio, action, wp, wa) == gemms
    # backward: d proprio / d action in the backward op, dWp / dWa as aten.mm
    assert count(fn, visual, proprio, action, wp, wa, backward=True) == 3 * gemms


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
FRAMES = {  # name -> frame ids (N,)
    "frame_major": reference.frame_ids_for(3, 11),
    "uneven_permuted": torch.tensor([0] * 5 + [1] * 9 + [2] * 2 + [3] * 7)[torch.randperm(23)],
}


@pytest.mark.parametrize("frames", FRAMES, ids=list(FRAMES))
def test_allowed_pairs(frames):
    frame_ids = FRAMES[frames]
    assert flops.allowed_pairs(frame_ids) == brute_force_allowed(frame_ids)
    assert flops.allowed_pairs(frame_ids.to(torch.int32)) == brute_force_allowed(frame_ids)


@pytest.mark.parametrize("frames", FRAMES, ids=list(FRAMES))
def test_block_causal_attention_triton(frames):
    frame_ids = FRAMES[frames]
    b, h, n, d = 1, 2, frame_ids.numel(), 16
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    fwd = 4 * b * h * d * brute_force_allowed(frame_ids)

    def fn(q_, k_, v_):
        return attention.block_causal_attention_triton(q_, k_, v_, frame_ids)

    assert count(fn, q, k, v) == fwd
    assert count(fn, q, k, v, backward=True) == fwd + 5 * fwd // 2


@pytest.mark.parametrize("frames", FRAMES, ids=list(FRAMES))
def test_frame_prefix_sdpa(frames):
    """The CPU `sdpa` backend (per-frame prefix SDPA) runs aten's CPU flash kernels: counted through the
    formulas kernels.dispatch registers, it does exactly the allowed score entries."""
    from torch.utils import flop_counter

    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry
    frame_ids = FRAMES[frames]
    b, h, n, d = 2, 3, frame_ids.numel(), 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    fwd = 4 * b * h * d * brute_force_allowed(frame_ids)

    def fn(q_, k_, v_):
        return dispatch.frame_prefix_attention(q_, k_, v_, frame_ids)

    assert count(fn, q, k, v) == fwd
    assert count(fn, q, k, v, backward=True) == fwd + 5 * fwd // 2


def test_sdpa_cpu_shapes():
    """The CPU flash formulas on one plain SDPA call with Nq != Nk."""
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    fwd = 4 * 2 * 3 * 5 * 9 * 8
    assert count(torch.nn.functional.scaled_dot_product_attention, q, k, v) == fwd
    assert count(torch.nn.functional.scaled_dot_product_attention, q, k, v, backward=True) == fwd + 5 * fwd // 2


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
def test_formula_reaches_a_running_counter():
    """FlopCounterMode copies the registry when created; the kernel modules are imported lazily, often
    inside the step being counted: `register_flops` also adds the formula to the running counters."""

    @torch.library.custom_op("dinowm_test::scaled_copy", mutates_args=())
    def scaled_copy(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0

    @scaled_copy.register_fake
    def _(x):
        return torch.empty_like(x)

    with FlopCounterMode(display=False) as counter:
        flops.register_flops(torch.ops.dinowm_test.scaled_copy)(lambda x, *a, out_val=None, **kw: 7 * x.numel())
        scaled_copy(torch.randn(3, 4))
    assert counter.get_total_flops() == 7 * 12


def test_allowed_pairs_without_values():
    """Fake or meta frame ids (tracing): the dense N * N."""
    assert flops.allowed_pairs(torch.empty(9, dtype=torch.int32, device="meta")) == 81


def test_lazy_import_inside_the_counted_step():
    """What the trainer does: the first step, counted, is the one that imports the Triton module through
    the dispatcher (fresh interpreter)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "import kernels, sys\n"
        "assert 'kernels.ln_linear' not in sys.modules\n"
        "x, w = torch.randn(5, 16), torch.randn(8, 16)\n"
        "with FlopCounterMode(display=False) as c:\n"
        "    kernels.layernorm_linear(x, None, None, w, None, backend='triton')\n"
        "print(c.get_total_flops())\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 2 * 5 * 16 * 8
