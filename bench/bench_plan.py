"""Planning latency: milliseconds per re-plan (CEM and GD) at given samples x horizon, same run.

Fast path: all candidates rolled out as one batch (CEM), bf16 autocast where it pays (CUDA, CPUs
with AVX-512 BF16), and on CUDA the cost evaluations replayed from CUDA graphs (skipped on CPU). Baseline: candidates rolled out one at a time (`chunk = 1`), fp32 - how a planner
loop without batching runs. The model is the demo's (demo.toml: 64 px, 4x4 patches, the full 6-layer
predictor) on a GPU or `--benchmark-only`; a 1-layer model under --benchmark-disable.

    pytest bench/bench_plan.py --benchmark-only        # CEM 64 samples x horizon 5, GD 8 restarts x horizon 5
    pytest bench/bench_plan.py --benchmark-disable     # a quick run at tiny shapes (CI)

One re-plan = `iterations` CEM iterations (or GD steps) from a 3-frame context; random weights and
inputs (the cost does not depend on their values).
"""
from __future__ import annotations

import pytest
import torch

from dinowm.config import load_config
from dinowm.models.world_model import build_world_model
from dinowm.planner import Context, CostGraphs, GoalCost, Planner, PlannerSettings

SHAPES = {
    "demo": (dict(samples=64, elites=8, horizon=5, iterations=3, restarts=8), []),
    "tiny": (dict(samples=8, elites=2, horizon=2, iterations=1, restarts=2), ["--model.predictor_depth", "1"]),
}
VARIANTS = {
    "unbatched_fp32": dict(chunk=1, dtype=torch.float32),
    "batched_fp32": dict(chunk=0, dtype=torch.float32),
    "batched_bf16": dict(chunk=0, dtype=torch.bfloat16),
    "batched_bf16_cuda_graphs": dict(chunk=0, dtype=torch.bfloat16, cuda_graphs=True),
}
_baseline: dict[tuple, float] = {}


def _setup(shape: str, method: str, variant: dict, device):
    settings, overrides = SHAPES[shape]
    cfg = load_config("demo.toml", overrides)
    torch.manual_seed(0)
    model = build_world_model(cfg.model, cfg.data).to(device).eval().requires_grad_(False)
    n, s, da = cfg.data.num_hist, cfg.data.img_size, 9 * cfg.data.frameskip
    ctx = Context(torch.rand(n, 3, s, s, device=device) * 2 - 1, torch.randn(n, 3, device=device),
                  torch.randn(n - 1, da, device=device))
    cost = GoalCost(model, ctx, torch.rand(3, s, s, device=device) * 2 - 1, None, da)
    planner = Planner(PlannerSettings(method=method, chunk=variant["chunk"], **settings), da, cfg.data.frameskip,
                      device, variant["dtype"], CostGraphs(device) if variant.get("cuda_graphs") else None)
    return (lambda: planner.plan(cost)), settings


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["cem", "gd"])
def test_replan_latency(benchmark, request, bench_utils, device, method, variant):
    shape = "tiny" if request.config.getoption("benchmark_disable") else "demo"
    if method == "gd" and variant == "unbatched_fp32":
        pytest.skip("GD optimises its few restarts as one batch; the unbatched baseline is CEM's")
    if VARIANTS[variant].get("cuda_graphs") and device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    plan, settings = _setup(shape, method, VARIANTS[variant], device)
    benchmark.group = f"replan[{method},{shape}]"
    out = benchmark.pedantic(plan, rounds=3, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out["actions"]).all() and out["ms"] > 0
    benchmark.extra_info.update(shape=shape, device=bench_utils.device_name(device), variant=variant, **settings)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a quick test
        return
    ms = benchmark.stats.stats.min * 1e3
    benchmark.extra_info["ms_per_replan"] = ms
    key = (shape, method)
    if variant == ("unbatched_fp32" if method == "cem" else "batched_fp32"):
        _baseline[key] = ms
    elif key in _baseline:
        benchmark.extra_info[f"speedup_vs_{'unbatched_fp32' if method == 'cem' else 'batched_fp32'}"] = _baseline[key] / ms
