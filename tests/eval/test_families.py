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
from dinowm.planner import Context, CostGraphs, GoalCost, PlanError, Planner, PlannerSettings


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


def two_costs(model, da, dp, device="cpu"):
    """Two goal costs of different contexts and goals (two re-plans), on fresh random inputs."""
    n = model.context_frames
    weight = 0.0 if isinstance(model, ACWorldModel) else 0.5  # AC latents have no proprio part
    costs = []
    for _ in range(2):
        obs = torch.rand(n + 1, 3, 32, 32, device=device) * 2 - 1
        ctx = Context(obs[:n], torch.randn(n, dp, device=device), torch.randn(n - 1, da, device=device))
        costs.append(GoalCost(model, ctx, obs[-1], torch.randn(dp, device=device), da, proprio_weight=weight))
    return costs


@pytest.mark.parametrize("family", [dino_wm, ac])
def test_a_clone_loaded_with_another_cost_evaluates_as_that_cost(family):
    """What the planner's CUDA graphs rely on: the captured (cloned) cost, loaded in place with a later
    re-plan's tensors, is that re-plan's cost; and the clone shares no tensor with its source."""
    model, da, dp = family()
    first, second = two_costs(model, da, dp)
    x = torch.randn(5, 2, da)
    with torch.no_grad():
        want_first, want_second = first(x), second(x)
        static = first.clone()
        static.load_(second)
        torch.testing.assert_close(static(x), want_second, rtol=0, atol=0)
        torch.testing.assert_close(first(x), want_first, rtol=0, atol=0)
    assert not torch.equal(want_first, want_second)


def test_cuda_graphs_are_refused_on_cpu():
    with pytest.raises(PlanError, match="CUDA graphs need a CUDA device.*cpu"):
        CostGraphs("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("family", [dino_wm, ac])
@pytest.mark.parametrize("method", ["cem", "gd"])
def test_gpu_cuda_graph_planning_equals_eager_over_replans(family, method):
    """Captured cost evaluations (CEM: costs; GD: costs and action gradients) replayed for two re-plans with
    different contexts equal the eager planner's, fp32, one graph per evaluation shape."""
    model, da, dp = family()
    model = model.cuda().requires_grad_(False)
    settings = PlannerSettings(method=method, samples=16, elites=4, iterations=3, restarts=3, hold=False, seed=3)
    graphs = CostGraphs("cuda")
    for i, cost in enumerate(two_costs(model, da, dp, "cuda")):  # two re-plans, each by a fresh planner
        eager, graphed = Planner(settings, da, 1, "cuda"), Planner(settings, da, 1, "cuda", graphs=graphs)
        want, got = eager.plan(cost, horizon=2), graphed.plan(cost, horizon=2)
        torch.testing.assert_close(got["actions"], want["actions"], rtol=1e-5, atol=1e-5)
        assert got["trace"] == pytest.approx(want["trace"], rel=1e-5, abs=1e-7)
        assert (got["capture_ms"] > 0) == (i == 0)  # the second re-plan only replays
    assert len(graphs.graphs) == (1 if method == "cem" else 2)  # GD: gradients + the final costs
