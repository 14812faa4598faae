"""One training step of the DINO world model: our fast path vs the original's step, same run.

Baseline ("original"): fp32, reference attention (explicit scores + dense mask), the frozen encoder
recomputed every step, the prediction decoded every step (docs/contract.md §7, §12).
Fast: the trainer's step (dinowm.step.TrainStep: fused optimisers, no host sync), encoder features from
the cache, prediction decoded only on logging steps, `auto` kernel backends, the machine's decoder
settings (dinowm.perf.configure: channels_last), fp32 or bf16 autocast; eager, compiled
(training.compile) and, on CUDA, compiled + CUDA graphs (training.cuda_graphs).
Every variant computes the same loss (checked) and trains the decoder on every frame every step.

The first benchmark times a 2048^3 bf16 matmul (8192^3 on CUDA): the machine's bf16 peak in this run.
Each fast variant records its achieved FLOP/s (FlopCounterMode over one step) and the fraction of that
peak in extra_info, next to `speedup_vs_original`.

    pytest bench/bench_train_step.py --benchmark-only            # franka.toml shapes, batch 2 on CPU
    pytest bench/bench_train_step.py --benchmark-disable         # a quick run at tiny shapes (CI)

Inputs are random tensors of the real shapes: the step's cost does not depend on pixel values.
"""
from __future__ import annotations

import pytest
import torch

from dinowm import perf
from dinowm.config import load_config
from dinowm.metrics import count_step_flops
from dinowm.models.world_model import build_world_model
from dinowm.schedule import Schedule
from dinowm.step import TrainStep, build_optimizers

STEP_CONFIGS = {
    # (batch, overrides): franka.toml on a GPU uses batch 32; on 2 CPU cores batch 2 is what fits in time
    "franka": (32 if torch.cuda.is_available() else 2, []),
    "tiny": (2, ["--data.img_size", "32", "--model.encoder_image_size", "28", "--model.predictor_depth", "1"]),
}
VARIANTS = {
    "original_fp32": dict(backend="reference", cache=False, decode_prediction=True, dtype=torch.float32, fast=False),
    "fast_fp32": dict(backend="auto", cache=True, decode_prediction=False, dtype=torch.float32, fast=True),
    "fast_bf16": dict(backend="auto", cache=True, decode_prediction=False, dtype=torch.bfloat16, fast=True),
    "compiled_bf16": dict(backend="auto", cache=True, decode_prediction=False, dtype=torch.bfloat16, fast=True,
                          compile=True),
    "compiled_cuda_graphs_bf16": dict(backend="auto", cache=True, decode_prediction=False, dtype=torch.bfloat16,
                                      fast=True, compile=True, cuda_graphs=True),
}
_baseline_seconds: dict[str, float] = {}
_peak: dict[str, float] = {}  # device -> bf16 matmul FLOP/s measured in this session


def test_bf16_matmul_peak(benchmark, request):
    """The machine's bf16 matmul throughput (the denominator of the step's fraction of peak)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 256 if request.config.getoption("benchmark_disable") else (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))

    def matmul():
        out = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = "bf16_matmul_peak"
    benchmark.pedantic(matmul, rounds=10 if device.type == "cpu" else 50, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(n=n, device=str(device), threads=torch.get_num_threads())
    if benchmark.stats is not None:
        _peak[str(device)] = 2 * n ** 3 / benchmark.stats.stats.min
        benchmark.extra_info["gflops"] = _peak[str(device)] / 1e9


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
    if variant["fast"]:
        perf.configure(model, device, variant["dtype"])
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

    if variant["fast"]:  # the trainer's step (dinowm/step.py): fused optimisers, no host sync
        train_step = TrainStep(model, build_optimizers(model, cfg.optim),
                               Schedule.from_config(cfg.optim, 1000), device, variant["dtype"],
                               compile=variant.get("compile", False), cuda_graphs=variant.get("cuda_graphs", False),
                               backend="aot_eager" if shape == "tiny" else "inductor")  # tiny: no code generation

        def step():
            out = train_step(inputs, 0, decode_prediction=variant["decode_prediction"])
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out["loss"]

        return step, batch, device, loss0
    # the original's step: torch.optim defaults (no fused or foreach kernels on CPU), decoded prediction
    groups = model.parameter_groups()
    optimizers = [torch.optim.AdamW(groups["predictor"], lr=cfg.optim.predictor_lr),
                  torch.optim.AdamW(groups["embeddings"], lr=cfg.optim.embedding_lr),
                  torch.optim.Adam(groups["decoder"], lr=cfg.optim.decoder_lr)]

    def step():
        with autocast():
            out = model(**inputs, decode_prediction=variant["decode_prediction"])
        out["loss"].backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out["loss"]

    return step, batch, device, loss0


# variant -> relative tolerance of its loss against the original's (same weights, same inputs)
LOSS_RTOL = {"original_fp32": 0.0, "fast_fp32": 1e-4, "fast_bf16": 3e-2, "compiled_bf16": 3e-2,
             "compiled_cuda_graphs_bf16": 3e-2}
_first_losses: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, request, variant):
    if VARIANTS[variant].get("cuda_graphs") and not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA device")
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
        return
    if shape in _baseline_seconds:
        benchmark.extra_info["speedup_vs_original"] = _baseline_seconds[shape] / seconds
    flops = count_step_flops(step)[1]  # one more step, counted (forward + backward)
    benchmark.extra_info["gflop_per_step"] = flops / 1e9
    benchmark.extra_info["achieved_gflops"] = flops / seconds / 1e9
    if str(device) in _peak:
        benchmark.extra_info["fraction_of_bf16_peak"] = flops / seconds / _peak[str(device)]
