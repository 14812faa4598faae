"""One training step of the DINO world model: our fast path vs the original's step, same run.

Baseline ("original"): fp32, reference attention (explicit scores + dense mask), the frozen encoder
recomputed every step, the prediction decoded every step (docs/contract.md §7, §12).
Fast: encoder features from the cache, prediction decoded only on logging steps, `auto` kernel
backends, fp32 or bf16 autocast.

    pytest bench/bench_train_step.py --benchmark-only            # franka.toml shapes, batch 2 on CPU
    pytest bench/bench_train_step.py --benchmark-disable         # a quick run at tiny shapes (CI)

Inputs are random tensors of the real shapes: the step's cost does not depend on pixel values.
"""
from __future__ import annotations

import pytest
import torch

from dinowm.config import load_config
from dinowm.models.world_model import build_world_model
from dinowm.trainer import build_optimizers

STEP_CONFIGS = {
    # (batch, overrides): franka.toml on a GPU uses batch 32; on 2 CPU cores batch 2 is what fits in time
    "franka": (32 if torch.cuda.is_available() else 2, []),
    "tiny": (2, ["--data.img_size", "32", "--model.encoder_image_size", "28", "--model.predictor_depth", "1"]),
}
VARIANTS = {
    "original_fp32": dict(backend="reference", cache=False, decode_prediction=True, dtype=torch.float32),
    "fast_fp32": dict(backend="auto", cache=True, decode_prediction=False, dtype=torch.float32),
    "fast_bf16": dict(backend="auto", cache=True, decode_prediction=False, dtype=torch.bfloat16),
}
_baseline_seconds: dict[str, float] = {}


def _shape_name(request) -> str:
    return "tiny" if request.config.getoption("benchmark_disable") else "franka"


def _setup(shape: str, variant: dict):
    batch, overrides = STEP_CONFIGS[shape]
    backend = ["--model.attention_backend", variant["backend"], "--model.layernorm_linear_backend",
               "reference" if variant["backend"] == "reference" else "auto"]
    cfg = load_config("franka.toml", overrides + backend)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_world_model(cfg.model, cfg.data).to(device)
    optimizers = build_optimizers(model, cfg.optim)
    t, s = cfg.data.num_hist + cfg.data.num_pred, cfg.data.img_size
    inputs = {
        "obs": torch.rand(batch, t, 3, s, s, device=device) * 2 - 1,
        "proprio": torch.randn(batch, t, cfg.data.proprio_end - cfg.data.proprio_start, device=device),
        "action": torch.randn(batch, t, 9 * cfg.data.frameskip, device=device),
    }
    def autocast():
        return torch.autocast(device.type, dtype=variant["dtype"], enabled=variant["dtype"] != torch.float32)

    if variant["cache"]:  # as the trainer's FeatureCache: under the run's autocast, in the encoder's output dtype
        with torch.no_grad(), autocast():
            inputs["visual"] = model.encode_visual(inputs["obs"])  # (B, T, P, 384)
    with torch.no_grad(), autocast():  # the variants must compute the same loss (eval: no dropout draws)
        model.eval()
        loss0 = float(model(**inputs)["loss"])
        model.train()

    def step():
        with autocast():
            out = model(**inputs, decode_prediction=variant["decode_prediction"])
        out["loss"].backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out["loss"]

    return step, batch, device, loss0


# variant -> relative tolerance of its loss against the original's (same weights, same inputs)
LOSS_RTOL = {"original_fp32": 0.0, "fast_fp32": 1e-4, "fast_bf16": 3e-2}
_first_losses: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, request, variant):
    shape = _shape_name(request)
    step, batch, device, loss0 = _setup(shape, VARIANTS[variant])
    _first_losses[shape, variant] = loss0
    if variant != "original_fp32":
        original = _first_losses.get((shape, "original_fp32"))
        if original is None:  # run alone (-k): compute the original's loss here
            original = _setup(shape, VARIANTS["original_fp32"])[3]
        assert loss0 == pytest.approx(original, rel=LOSS_RTOL[variant]), (variant, loss0, original)
    benchmark.group = f"train_step[{shape}]"
    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(shape=shape, batch=batch, device=str(device), variant=variant)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a quick test
        return
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["seconds_per_step"] = seconds
    benchmark.extra_info["samples_per_s"] = batch / seconds
    if variant == "original_fp32":
        _baseline_seconds[shape] = seconds
    elif shape in _baseline_seconds:
        benchmark.extra_info["speedup_vs_original"] = _baseline_seconds[shape] / seconds
