"""Tiled Conv1d(k=1) embedding vs eager Conv1d + repeat + cat and the same under torch.compile.

    BENCH_THREADS=1 pytest bench/bench_embedding.py --benchmark-only --benchmark-group-by=group
    pytest bench/bench_embedding.py --benchmark-disable -q     # each benchmark once, tiny shapes

Shape: DINO-WM's concat_dim = 1 input, visual (B, 4, 256, 384) + proprio 3 -> 10 + action 45 -> 10
= (B, 4, 256, 404); B = 32 on CUDA, 4 on CPU. bf16 on CUDA, fp32 on CPU. Providers: `triton` (timed
on CUDA only; on CPU it runs as a quick test when TRITON_INTERPRET=1), `eager`, `compiled`.
extra_info: shape, dtype, device, GB/s of the minimal traffic (forward: read visual + write the
output; forward+backward adds one read of the upstream gradient) and `speedup_vs_<baseline>`
(minimum times, baselines timed once per session with the same inputs).
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

CASES = {"dinowm": ((32, 4), (4, 4), 256, 384, 3, 45, 10, 10)}  # (B, T) CUDA, (B, T) CPU, P, Dv, Dp, Da, Ep, Ea
TINY = {"dinowm": (2, 3, 7, 384, 3, 45, 10, 10)}  # B, T, P, Dv, Dp, Da, Ep, Ea under --benchmark-disable
PROVIDERS = ("triton", "eager", "compiled")
BASELINES = ("eager", "compiled")


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


def _make_step(provider, shape, mode, device, dtype):
    b, t, p, dv, dp, da, ep, ea = shape
    torch.manual_seed(0)
    make = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype)
    inputs = [make(b, t, p, dv), make(b, t, dp), make(b, t, da), make(ep, dp, scale=dp**-0.5), make(ep, scale=0.1),
              make(ea, da, scale=da**-0.5), make(ea, scale=0.1)]
    fn = _provider_fn(provider)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
        return step
    leaves = [x.requires_grad_() for x in inputs]
    grad = make(b, t, p, dv + ep + ea)

    def step():
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, grad)
    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_tiled_embedding(benchmark, bench_utils, timing_cache, device, case, mode, provider):
    small = bench_utils.is_disabled(benchmark)
    bench_utils.skip_untimed_triton(provider, device, small)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if small:
        shape = TINY[case]
    else:
        bt_cuda, bt_cpu, *rest = CASES[case]
        shape = (*(bt_cuda if device.type == "cuda" else bt_cpu), *rest)
    b, t, p, dv, dp, da, ep, ea = shape
    step = _make_step(provider, shape, mode, device, dtype)
    benchmark.group = f"tiled_embedding-{case}-{mode}"

    def timed():
        out = step()
        bench_utils.synchronize(device)
        return out

    out = benchmark.pedantic(timed, rounds=10 if device.type == "cpu" else 50, warmup_rounds=1 if small else 2,
                             iterations=1)
    y = out if mode == "fwd" else out[0]
    assert y.shape == (b, t, p, dv + ep + ea) and torch.isfinite(y).all()
    if small:
        return
    seconds = benchmark.stats.stats.min
    out_elems = b * t * p * (dv + ep + ea)
    nbytes = (b * t * p * dv + out_elems + (out_elems if mode == "fwd_bwd" else 0)) * dtype.itemsize
    benchmark.extra_info.update(case=case, shape=list(shape), dtype=str(dtype), mode=mode, provider=provider,
                                device=bench_utils.device_name(device), gb_per_s=round(nbytes / seconds / 1e9, 2))
    key = ("tiled_embedding", case, mode)
    timing_cache[(*key, provider)] = seconds
    for baseline in BASELINES:
        if baseline == provider:
            continue
        if (*key, baseline) not in timing_cache:
            timing_cache[(*key, baseline)] = bench_utils.best_time(_make_step(baseline, shape, mode, device, dtype),
                                                                   device, rounds=3)
        benchmark.extra_info[f"speedup_vs_{baseline}"] = round(timing_cache[(*key, baseline)] / seconds, 3)
