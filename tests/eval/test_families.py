"""Evaluation and planning use only the WorldModel protocol: both predictor families run through them."""
import pytest
import torch

from dinowm.config import load_config
from dinowm.eval import horizon_errors
from dinowm.models.ac_predictor import ACPredictor
from dinowm.models.ac_world_model import ACWorldModel
from dinowm.models.decoder import VQVAEDecoder
from dinowm.models.encoder import DinoV2Encoder
from dinowm.models.interface import WorldModel
from dinowm.models.world_model import build_world_model
from dinowm.planner import Context, GoalCost, Planner, PlannerSettings


def dino_wm():
    cfg = load_config("demo.toml", ["--data.img_size", "32", "--model.encoder_image_size", "28",
                                    "--model.predictor_depth", "1", "--model.predictor_heads", "2",
                                    "--model.predictor_dim_head", "16", "--model.predictor_mlp_dim", "64",
                                    "--data.frameskip", "1", "--data.num_hist", "2"])
    return build_world_model(cfg.model, cfg.data, action_dim=3).eval(), 3, 3  # actions 3 * fs 1, proprio 3


def ac():
    predictor = ACPredictor(visual_dim=384, action_dim=3, state_dim=3, grid=(2, 2), dim=48, depth=2, heads=2)
    return ACWorldModel(DinoV2Encoder(image_size=28), predictor, VQVAEDecoder(emb_dim=384)).eval(), 3, 3


@pytest.mark.parametrize("family", [dino_wm, ac])
def test_eval_and_cem_run_on_both_families(family):
    model, da, dp = family()
    assert isinstance(model, WorldModel)
    n, h = model.context_frames, 2
    obs = torch.rand(2, n + h, 3, 32, 32) * 2 - 1
    out = horizon_errors(model, obs, torch.randn(2, n + h, dp), torch.randn(2, n + h, da))
    assert out["model"]["z_visual_mse"].shape == out["copy_last"]["psnr"].shape == (2, h)
    assert out["decoded"].shape == (2, h, 3, 32, 32)
    ctx = Context(obs[0, :n], torch.randn(n, dp), torch.randn(n - 1, da))
    cost = GoalCost(model, ctx, obs[0, -1], None, da)
    result = Planner(PlannerSettings(samples=6, elites=2, iterations=2, hold=False), da, 1).plan(cost, horizon=2)
    assert result["actions"].shape == (2, da) and result["cost"] == min(result["trace"])
    gd = Planner(PlannerSettings(method="gd", iterations=2, restarts=1, hold=False), da, 1)
    # both rollouts are differentiable: the gradient moves the actions away from the 0 start
    assert gd.plan(cost, horizon=2)["raw"].abs().sum() > 0
