"""dinowm.eval: the baselines on a hand-computed example, the CLI's outputs and its one-line errors."""
import json

import pytest
import torch

from dinowm import eval as ev
from dinowm.checkpoint import atomic_save, load_checkpoint
from eval_helpers import cli_error


class ZeroPredictor(torch.nn.Module):
    """A world model whose latents are the visual features themselves and whose predictions are 0."""

    context_frames = 2

    def encode_visual(self, obs):
        raise AssertionError("the test passes features")

    def rollout(self, obs0, proprio0, actions, visual0=None):
        extra = actions.shape[1] - visual0.shape[1]
        return {"z": torch.cat([visual0, visual0.new_zeros(visual0.shape[0], extra, *visual0.shape[2:])], 1)}

    def decode(self, z, size=None):
        raise AssertionError("no images in this test")

    def split(self, z):
        return z, None, None


def test_copy_last_and_model_errors_match_a_hand_computation():
    b, n, h, p, d = 2, 2, 3, 2, 3
    visual = torch.randn(b, n + h, p, d)
    proprio, action = torch.randn(b, n + h, 1), torch.randn(b, n + h, 1)
    out = ev.horizon_errors(ZeroPredictor(), None, proprio, action, visual=visual, images=False)
    for i in range(b):
        for k in range(h):
            copy = model = copy_l1 = model_l1 = 0.0
            for j in range(p):
                for c in range(d):
                    copy += (float(visual[i, n - 1, j, c]) - float(visual[i, n + k, j, c])) ** 2
                    model += float(visual[i, n + k, j, c]) ** 2
                    copy_l1 += abs(float(visual[i, n - 1, j, c]) - float(visual[i, n + k, j, c]))
                    model_l1 += abs(float(visual[i, n + k, j, c]))
            assert out["copy_last"]["z_visual_mse"][i, k].item() == pytest.approx(copy / (p * d), rel=1e-5)
            assert out["model"]["z_visual_mse"][i, k].item() == pytest.approx(model / (p * d), rel=1e-5)
            assert out["copy_last"]["z_visual_l1"][i, k].item() == pytest.approx(copy_l1 / (p * d), rel=1e-5)
            assert out["model"]["z_visual_l1"][i, k].item() == pytest.approx(model_l1 / (p * d), rel=1e-5)


def test_averages_weight_every_sample_equally():
    acc = ev.HorizonAverages()
    acc.add({"model": {"m": torch.tensor([[1.0, 2.0]])}})
    acc.add({"model": {"m": torch.tensor([[3.0, 4.0], [5.0, 6.0]])}})
    assert acc.means()["model"]["m"] == pytest.approx([3.0, 4.0])


def test_sample_indices_are_a_seeded_subset_across_the_split():
    assert ev.sample_indices(10, 0, 0).tolist() == list(range(10))
    a, b = ev.sample_indices(1000, 50, 3), ev.sample_indices(1000, 50, 3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50 and int(a.max()) > 500


def test_cli_writes_metrics_table_plot_and_grid(tiny_run, tmp_path, capsys):
    result = ev.main([str(tiny_run), "--horizon", "2", "--out", str(tmp_path / "e")])
    for name in ("metrics.json", "metrics.csv", "error_vs_horizon.png", "rollout_grid.png"):
        assert (tmp_path / "e" / name).exists(), name
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(saved["metrics"]) == {"model", "copy_last", "untrained"}
    assert len(saved["metrics"]["copy_last"]["psnr"]) == 2 and saved["split"] == "validation"
    assert result["samples"] == result["windows"] > 0
    assert "ratio" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_run, tmp_path, capsys):
    line = cli_error(capsys, ev.main, tiny_run, "--horizon", "40", "--out", tmp_path / "e")
    assert "long enough for --horizon 40" in line and "lower --horizon" in line
    # a dataset folder that does not match (here: none at all) is named
    line = cli_error(capsys, ev.main, tiny_run, "--data.path", tmp_path / "nothing", "--out", tmp_path / "e")
    assert "nothing" in line
    assert "only --data.path" in cli_error(capsys, ev.main, tiny_run, "--model.predictor_depth", "2")
    if not torch.cuda.is_available():
        assert "no CUDA device" in cli_error(capsys, ev.main, tiny_run, "--device", "cuda", "--out", tmp_path / "e")
    ckpt = load_checkpoint(tiny_run)
    ckpt["config"]["model"]["predictor_depth"] = 2  # weights of a depth-1 predictor
    atomic_save(ckpt, tmp_path / "bad.pt")
    assert "bad.pt: the weights do not" in cli_error(capsys, ev.main, tmp_path / "bad.pt", "--out", tmp_path / "e")
