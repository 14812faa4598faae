"""The VQ-VAE decoder's forward + backward at franka.toml shapes (batch 2 x 4 frames of 16x16 patches ->
256 px; batch 32 on CUDA): NCHW vs channels_last activations and weights, fp32 and bf16 autocast. This is
the measurement behind dinowm.perf.configure's choice of channels_last.

    pytest bench/bench_decoder.py --benchmark-only          # extra_info: speedup_vs_nchw of channels_last
    pytest bench/bench_decoder.py --benchmark-disable       # once, at 2x2 patches (CI)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinowm.models.decoder import VQVAEDecoder

_nchw_seconds: dict[str, float] = {}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decoder(benchmark, request, device, dtype, layout):
    quick = request.config.getoption("benchmark_disable")
    frames, grid = (2, 2) if quick else ((32 if device.type == "cuda" else 2) * 4, 16)
    torch.manual_seed(0)
    decoder = VQVAEDecoder().to(device)
    decoder.channels_last = layout == "channels_last"
    if decoder.channels_last:
        decoder.to(memory_format=torch.channels_last)
    z = torch.randn(frames, 384, grid, grid, device=device)
    target = torch.rand(frames, 3, 16 * grid, 16 * grid, device=device) * 2 - 1

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.mse_loss(decoder(z).float(), target)
        loss.backward()
        decoder.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"decoder[{dtype}]"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(frames=frames, grid=grid, dtype=dtype, layout=layout, device=str(device))
    if benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.min
    if layout == "nchw":
        _nchw_seconds[dtype] = seconds
    elif dtype in _nchw_seconds:
        benchmark.extra_info["speedup_vs_nchw"] = _nchw_seconds[dtype] / seconds
