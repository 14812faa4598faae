"""Fused LayerNorm -> Linear vs eager F.layer_norm + F.linear and the same under torch.compile.

    BENCH_THREADS=1 pytest bench/bench_ln_linear.py --benchmark-only --benchmark-group-by=group
    pytest bench/bench_ln_linear.py --benchmark-disable -q     # each benchmark once, tiny shapes

Shapes are the DINO-WM predictor's pre-norm sites: rows = batch x 3 frames x 256 patches, width 404,
qkv 404 -> 3072 without bias, fc1 404 -> 2048 with bias (batch 32 on CUDA, 2 on CPU). bf16 on CUDA,
fp32 on CPU. Providers: `triton` (timed on CUDA only; on CPU it runs as a quick test when
TRITON_INTERPRET=1), `eager`, `compiled` (torch.compile of the eager pair). extra_info: shapes,
dtype, device, GFLOP/s (forward 2*M*K*N, forward+backward 3x) and `speedup_vs_<baseline>` =
t_baseline / t_provider (minimum times, baselines timed once per session with the same inputs).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

CASES = {  # name: (rows on CUDA, rows on CPU, K, N, bias)
    "qkv": (32 * 3 * 256, 2 * 3 * 256, 404, 3072, False),
    "fc1": (32 * 3 * 256, 2 * 3 * 256, 404, 2048, True),
}
TINY = {"qkv": (48, 404, 96, False), "fc1": (37, 404, 64, True)}  # under --benchmark-disable
PROVIDERS = ("triton", "eager", "compiled")
BASELINES = ("eager", "compiled")


def _eager(x, ln_weight, ln_bias, weight, bias, eps):
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps), weight, bias)


_compiled = torch.compile(_eager, dynamic=False)


def _provider_fn(provider):
    if provider == "triton":
        return importlib.import_module("kernels.ln_linear").layernorm_linear_triton
    return {"eager": _eager, "compiled": _compiled}[provider]


def _make_step(provider, rows, k, n, bias, mode, device, dtype):
    torch.manual_seed(0)
    make = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, device=device) * scale + shift).to(dtype)
    x = make(rows, k)  # (M, K)
    params = [make(k, scale=0.1, shift=1.0), make(k, scale=0.1), make(n, k, scale=k**-0.5),
              make(n, scale=0.1) if bias else None]
    fn = _provider_fn(provider)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x, *params, 1e-5)
        return step
    leaves = [t.requires_grad_() for t in [x] + params if t is not None]
    dy = make(rows, n)

    def step():
        y = fn(x, *params, 1e-5)
        return y, torch.autograd.grad(y, leaves, dy)
    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_layernorm_linear(benchmark, bench_utils, timing_cache, device, case, mode, provider):
    small = bench_utils.is_disabled(benchmark)
    bench_utils.skip_untimed_triton(provider, device, small)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if small:
        rows, k, n, bias = TINY[case]
    else:
        rows_cuda, rows_cpu, k, n, bias = CASES[case]
        rows = rows_cuda if device.type == "cuda" else rows_cpu
    step = _make_step(provider, rows, k, n, bias, mode, device, dtype)
    benchmark.group = f"layernorm_linear-{case}-{mode}"

    def timed():
        out = step()
        bench_utils.synchronize(device)
        return out

    out = benchmark.pedantic(timed, rounds=5 if device.type == "cpu" else 20, warmup_rounds=1 if small else 2,
                             iterations=1)
    y = out if mode == "fwd" else out[0]
    assert y.shape == (rows, n) and torch.isfinite(y).all()
    if small:
        return
    seconds = benchmark.stats.stats.min
    flops = 2 * rows * k * n * (3 if mode == "fwd_bwd" else 1)
    benchmark.extra_info.update(case=case, shape=f"({rows}, {k}) -> {n}", bias=bias, dtype=str(dtype), mode=mode,
                                provider=provider, device=bench_utils.device_name(device),
                                gflops=round(flops / seconds / 1e9, 2))
    key = ("layernorm_linear", case, mode)
    timing_cache[(*key, provider)] = seconds
    for baseline in BASELINES:
        if baseline == provider:
            continue
        if (*key, baseline) not in timing_cache:
            timing_cache[(*key, baseline)] = bench_utils.best_time(
                _make_step(baseline, rows, k, n, bias, mode, device, dtype), device, rounds=3)
        benchmark.extra_info[f"speedup_vs_{baseline}"] = round(timing_cache[(*key, baseline)] / seconds, 3)
