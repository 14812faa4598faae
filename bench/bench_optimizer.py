"""One optimiser step over the franka.toml model's trained parameters: fused vs foreach vs for-loop AdamW.

Why build_optimizers uses fused kernels on every device: on CPU torch's foreach ops loop over the
tensors one by one, while the fused kernel is one vectorised pass; fused is also the only implementation
that takes `found_inf` (the sync-free skip of a non-finite step).

    pytest bench/bench_optimizer.py --benchmark-only       # the franka.toml parameter shapes
    pytest bench/bench_optimizer.py --benchmark-disable    # a quick run at tiny shapes (CI)
"""
from __future__ import annotations

import pytest
import torch

from dinowm.config import load_config
from dinowm.models.world_model import build_world_model

IMPLEMENTATIONS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}
_baseline: dict[str, float] = {}


@pytest.mark.parametrize("implementation", ["foreach", "fused", "for_loop"])
def test_optimizer_step(benchmark, request, device, implementation):
    tiny = request.config.getoption("benchmark_disable")
    overrides = ["--data.img_size", "32", "--model.encoder_image_size", "28", "--model.predictor_depth", "1"] if tiny else []
    cfg = load_config("franka.toml", overrides)
    shapes = [p.shape for p in build_world_model(cfg.model, cfg.data).parameters() if p.requires_grad]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **IMPLEMENTATIONS[implementation])

    def step():
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"optimizer_step[{'tiny' if tiny else 'franka'}]"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    assert all(torch.isfinite(p).all() for p in params)
    benchmark.extra_info.update(parameters=sum(p.numel() for p in params), device=str(device),
                                implementation=implementation)
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.mean
    if implementation == "foreach":
        _baseline[benchmark.group] = seconds
    elif benchmark.group in _baseline:
        benchmark.extra_info["speedup_vs_foreach"] = _baseline[benchmark.group] / seconds
