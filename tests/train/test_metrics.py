"""Image metrics and the metric sink."""
import json
import math

import torch

from dinowm.metrics import MetricSink, psnr, ssim


def test_psnr_of_a_known_error():
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    pred = (target + 0.2).clamp(-1, 1)  # on the [0, 1] scale an error of 0.1 where not clamped
    mse01 = (((pred + 1) / 2 - (target + 1) / 2) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(pred, target), 10 * torch.log10(1 / mse01))
    assert psnr(target, target).min() > 90  # identical: only the 1e-10 floor


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
