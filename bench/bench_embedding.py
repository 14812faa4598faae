"""Tiled Conv1d(k=1) embedding vs eager Conv1d + repeat + cat and the same under torch.compile.

    pytest bench/bench_embedding.py --benchmark-only --benchmark-group-by=group
    pytest bench/bench_embedding.py --benchmark-disable     # once each at tiny shapes (CI)

Shape: DINO-WM's concat_dim = 1 input, visual (B, 4, 256, 384) + proprio 3 -> 10 + action 45 -> 10
= (B, 4, 256, 404); B = 32 on a GPU, 4 on CPU. bf16 on CUDA, fp32 on CPU. The Triton provider is
timed on CUDA only (on CPU it runs as a quick test when TRITON_INTERPRET=1). Every benchmark records
GB/s of the minimal traffic (forward: read visual + write the output; forward+backward adds one read
of the upstream gradient) and its speed ratio to each baseline.
"""
from __future__ import annotations

import importlib
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CASES = {"dinowm": (32 if CUDA else 4, 4, 256, 384, 3, 45, 10, 10)}  # B, T, P, Dv, Dp, Da, Ep, Ea
TINY = {"dinowm": (2, 3, 7, 384, 3, 45, 10, 10)}
PROVIDERS = ("eager", "compiled", "triton")
BASELINES = ("eager", "compiled")
_seconds: dict[tuple, float] = {}  # (case, mode, provider) -> median seconds, shared across tests


def _eager(visual, proprio, action, proprio_weight, proprio_bias, action_weight, action_bias):
    """The original model's way: Conv1d over time, repeat over patches, concatenate."""
    p = visual.shape[2]
    pe = F.conv1d(proprio.transpose(1, 2), proprio_weight[:, :, None], proprio_bias).transpose(1, 2)  # (B, T, Ep)
    ae = F.conv1d(action.transpose(1, 2), action_weight[:, :, None], action_bias).transpose(1, 2)  # (B, T, Ea)
    pe = pe[:, :, None, :].repeat(1, 1, p, 1)  # (B, T, P, Ep)
    ae = ae[:, :, None, :].repeat(1, 1, p, 1)  # (B, T, P, Ea)
    return torch.cat([visual, pe, ae], dim=-1)  # (B, T, P, Dv + Ep + Ea)


_compiled = torch.compile(_eager, dynamic=False)


def _provider_fn(provider):
    if provider == "triton":
        return importlib.import_module("kernels.embedding").tiled_embedding_triton
    return {"eager": _eager, "compiled": _compiled}[provider]


def _make_step(provider, shape, mode):
    b, t, p, dv, dp, da, ep, ea = shape
    torch.manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE) * scale).to(DTYPE)
    inputs = [make(b, t, p, dv), make(b, t, dp), make(b, t, da), make(ep, dp, scale=dp**-0.5), make(ep, scale=0.1),
              make(ea, da, scale=da**-0.5), make(ea, scale=0.1)]
    fn = _provider_fn(provider)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                out = fn(*inputs)
            if CUDA:
                torch.cuda.synchronize()
            return out
        return step
    leaves = [x.requires_grad_() for x in inputs]
    grad = make(b, t, p, dv + ep + ea)

    def step():
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad)
        if CUDA:
            torch.cuda.synchronize()
        return out, grads
    return step


def _median_seconds(step, reps=5):
    step()
    if CUDA:
        import triton
        return triton.testing.do_bench(step) * 1e-3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_tiled_embedding(benchmark, request, provider, case, mode):
    quick = request.config.getoption("benchmark_disable")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if provider == "triton" and not CUDA and not (quick and interpreting):
        pytest.skip("Triton is timed on CUDA only; on CPU it runs as a quick test under TRITON_INTERPRET=1")
    shape = (TINY if quick else CASES)[case]
    b, t, p, dv, dp, da, ep, ea = shape
    step = _make_step(provider, shape, mode)
    benchmark.group = f"tiled_embedding {case} {mode}"
    out = benchmark.pedantic(step, rounds=10 if not CUDA else 50, warmup_rounds=2, iterations=1)
    y = out if mode == "fwd" else out[0]
    assert y.shape == (b, t, p, dv + ep + ea) and torch.isfinite(y).all()

    size = DTYPE.itemsize
    nbytes = b * t * p * (dv + (dv + ep + ea)) * size + (b * t * p * (dv + ep + ea) * size if mode != "fwd" else 0)
    benchmark.extra_info.update(case=case, mode=mode, provider=provider, shape=list(shape), dtype=str(DTYPE),
                                device=torch.cuda.get_device_name() if CUDA else "cpu")
    if benchmark.stats is None:  # --benchmark-disable: ran once as a quick test
        return
    seconds = benchmark.stats.stats.median
    _seconds[(case, mode, provider)] = seconds
    benchmark.extra_info["gb_per_s"] = nbytes / seconds / 1e9
    for base in BASELINES:
        if base == provider:
            continue
        key = (case, mode, base)
        if key not in _seconds:
            _seconds[key] = _median_seconds(_make_step(base, shape, mode))
        benchmark.extra_info[f"speedup_vs_{base}"] = _seconds[key] / seconds
