"""Image metrics, the metric sink, the step timer."""
import json
import math

import pytest
import torch

from dinowm.metrics import MetricSink, StepTimer, peak_flops_of, psnr, ssim


def test_psnr_is_20_db_at_rms_error_0_1():
    """An error of 0.1 on the [0, 1] scale (0.2 in the model's [-1, 1] units) is PSNR 20 dB exactly."""
    target = torch.rand(2, 3, 16, 16) - 0.5  # inside [-1, 1] after the error: nothing clamped
    sign = torch.where(torch.rand(target.shape) < 0.5, -1.0, 1.0)
    pred = target + 0.2 * sign
    torch.testing.assert_close(psnr(pred, target), torch.full((2,), 20.0), rtol=0, atol=1e-4)
    assert psnr(target, target).min() > 90  # identical: only the 1e-10 floor


def _fixed_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 32x32 pattern in [0, 1] and a distorted copy (no random numbers: the value below is fixed)."""
    y, x = torch.meshgrid(torch.arange(32, dtype=torch.float64) / 31, torch.arange(32, dtype=torch.float64) / 31,
                          indexing="ij")
    a = 0.5 + 0.4 * torch.sin(6 * x) * torch.cos(4 * y)
    b = (a + 0.1 * torch.sin(17 * x + 3 * y)).clamp(0, 1)
    return a, b


# skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
# data_range=1.0) with scikit-image 0.26.0 on `_fixed_pair()` (a published implementation of Wang et al. 2004)
SKIMAGE_SSIM = 0.7243797566366936


def test_ssim_matches_scikit_image_on_a_fixed_pair():
    a, b = _fixed_pair()
    to_model = lambda img: (img * 2 - 1).float().expand(1, 3, 32, 32)  # [0, 1] grey -> (1, 3, H, W) in [-1, 1]
    ours = float(ssim(to_model(b), to_model(a)))
    assert ours == pytest.approx(SKIMAGE_SSIM, abs=1e-5)
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    value = structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, data_range=1.0)
    assert ours == pytest.approx(value, abs=1e-5)


def test_ssim_and_psnr_inside_bf16_autocast_equal_fp32():
    """The trainer and the evaluator call them inside the run's autocast region."""
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    pred = (target + 0.1 * torch.randn(target.shape, generator=g)).clamp(-1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = ssim(pred, target), psnr(pred, target)
    torch.testing.assert_close(in_autocast, (ssim(pred, target), psnr(pred, target)), rtol=1e-6, atol=1e-6)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(target, target), torch.ones(2), atol=1e-5)
    noisy = [ssim((target + s * torch.randn(target.shape, generator=g)).clamp(-1, 1), target).mean() for s in (0.05, 0.2, 0.8)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]


def test_metric_sink_writes_jsonl(tmp_path):
    sink = MetricSink(tmp_path, config={})
    sink.write(3, "train", {"loss": torch.tensor(0.5), "note": "x"})
    sink.close()
    (record,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert record["step"] == 3 and record["split"] == "train" and math.isclose(record["loss"], 0.5)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def _steps(timer, clock, n, wait, compute, batch):
    for _ in range(n):
        clock.advance(wait)
        timer.data_ready()
        clock.advance(compute)
        timer.step_done(batch)


def test_step_timer_window_leaves_out_what_runs_inside_excluded():
    clock = FakeClock()
    timer = StepTimer(torch.device("cpu"), flops_per_sample=2e9, clock=clock)
    _steps(timer, clock, 3, wait=0.1, compute=0.4, batch=8)
    with timer.excluded():  # a validation of 30 s between two steps
        clock.advance(30.0)
    _steps(timer, clock, 1, wait=0.1, compute=0.4, batch=8)
    s = timer.summary()
    assert s["excluded_s"] == pytest.approx(30.0)
    assert s["step_time_s"] == pytest.approx(0.5)  # 4 steps in 2 s, not 32 s
    assert s["samples_per_s"] == pytest.approx(16.0)
    assert s["data_wait_pct"] == pytest.approx(20.0)  # the wait after the validation is 0.1 s, not 30.1
    assert s["tflops"] == pytest.approx(2e9 * 32 / 2.0 / 1e12)
    assert "mfu_pct" not in s and "peak_mem_gib" not in s  # the CPU: no known peak, no CUDA memory
    # the next window starts fresh
    _steps(timer, clock, 2, wait=0.0, compute=1.0, batch=8)
    s = timer.summary()
    assert s["step_time_s"] == pytest.approx(1.0) and s["excluded_s"] == 0 and s["data_wait_pct"] == 0


def test_mfu_against_the_dense_bf16_peak_of_known_gpus(monkeypatch):
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12  # not the SXM figure
    assert peak_flops_of("NVIDIA H200") == 989e12 and peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of("Tesla T4") is None  # unknown: TFLOP/s only
    import dinowm.metrics

    monkeypatch.setattr(dinowm.metrics, "device_peak_flops", lambda device: peak_flops_of("NVIDIA H100 80GB HBM3"))
    clock = FakeClock()
    timer = StepTimer(torch.device("cpu"), flops_per_sample=1e12, devices=2, clock=clock)  # two H100 ranks
    _steps(timer, clock, 1, wait=0.0, compute=1.0, batch=64)
    s = timer.summary()
    assert s["tflops"] == pytest.approx(64.0) and s["mfu_pct"] == pytest.approx(100 * 64e12 / (2 * 989e12))
