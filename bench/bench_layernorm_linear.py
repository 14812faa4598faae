"""Fused LayerNorm -> Linear vs eager F.layer_norm + F.linear and the same under torch.compile.

    pytest bench/bench_layernorm_linear.py --benchmark-only --benchmark-group-by=group
    pytest bench/bench_layernorm_linear.py --benchmark-disable     # once each at tiny shapes (CI)

Shapes are the DINO-WM predictor's pre-norm sites: rows = batch x 3 frames x 256 patches, width 404,
qkv 404 -> 3072 without bias, fc1 404 -> 2048 with bias (batch 32 on a GPU, 2 on CPU). bf16 on CUDA,
fp32 on CPU. The Triton provider is timed on CUDA only (on CPU it runs under the interpreter, which
measures nothing useful; it runs there as a quick test when TRITON_INTERPRET=1). Every benchmark
records GFLOP/s (forward 2*M*K*N; forward+backward 3x that) and its speed ratio to each baseline.
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
CASES = {  # name: (rows, K, N, bias)
    "qkv": ((32 if CUDA else 2) * 3 * 256, 404, 3072, False),
    "fc1": ((32 if CUDA else 2) * 3 * 256, 404, 2048, True),
}
TINY = {"qkv": (2 * 3 * 8, 404, 96, False), "fc1": (37, 404, 64, True)}
PROVIDERS = ("eager", "compiled", "triton")
BASELINES = ("eager", "compiled")
_seconds: dict[tuple, float] = {}  # (case, mode, provider) -> median seconds, shared across tests


def _eager(x, ln_weight, ln_bias, weight, bias, eps):
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)


_compiled = torch.compile(_eager, dynamic=False)


def _provider_fn(provider):
    if provider == "triton":
        return importlib.import_module("kernels.layernorm_linear").layernorm_linear_triton
    return {"eager": _eager, "compiled": _compiled}[provider]


def _make_step(provider, rows, k, n, bias, mode):
    torch.manual_seed(0)
    x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
    params = [1 + 0.1 * torch.randn(k, device=DEVICE, dtype=DTYPE), 0.1 * torch.randn(k, device=DEVICE, dtype=DTYPE),
              torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5,
              0.1 * torch.randn(n, device=DEVICE, dtype=DTYPE) if bias else None]
    fn = _provider_fn(provider)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                y = fn(x, *params, 1e-5)
            if CUDA:
                torch.cuda.synchronize()
            return y
        return step
    leaves = [t.requires_grad_() for t in [x] + params if t is not None]
    dy = torch.randn(rows, n, device=DEVICE, dtype=DTYPE)

    def step():
        y = fn(x, *params, 1e-5)
        grads = torch.autograd.grad(y, leaves, dy)
        if CUDA:
            torch.cuda.synchronize()
        return y, grads
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
def test_layernorm_linear(benchmark, request, provider, case, mode):
    quick = request.config.getoption("benchmark_disable")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if provider == "triton" and not CUDA and not (quick and interpreting):
        pytest.skip("Triton is timed on CUDA only; on CPU it runs as a quick test under TRITON_INTERPRET=1")
    rows, k, n, bias = (TINY if quick else CASES)[case]
    step = _make_step(provider, rows, k, n, bias, mode)
    benchmark.group = f"layernorm_linear {case} {mode}"
    out = benchmark.pedantic(step, rounds=5 if not CUDA else 20, warmup_rounds=1, iterations=1)
    y = out if mode == "fwd" else out[0]
    assert y.shape == (rows, n) and torch.isfinite(y).all()

    flops = 2 * rows * k * n * (1 if mode == "fwd" else 3)
    benchmark.extra_info.update(case=case, mode=mode, provider=provider, rows=rows, K=k, N=n, bias=bias,
                                dtype=str(DTYPE), device=torch.cuda.get_device_name() if CUDA else "cpu")
    if benchmark.stats is None:  # --benchmark-disable: ran once as a quick test
        return
    seconds = benchmark.stats.stats.median
    _seconds[(case, mode, provider)] = seconds
    benchmark.extra_info["gflop_per_s"] = flops / seconds / 1e9
    for base in BASELINES:
        if base == provider:
            continue
        key = (case, mode, base)
        if key not in _seconds:
            _seconds[key] = _median_seconds(_make_step(base, rows, k, n, bias, mode))
        benchmark.extra_info[f"speedup_vs_{base}"] = _seconds[key] / seconds
