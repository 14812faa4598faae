"""dinowm.planner on a toy world model whose dynamics are known: a linear latent system."""
import pytest
import torch

from dinowm.planner import Context, GoalCost, PlanError, Planner, PlannerSettings, mpc_episode

D, A, S = 12, 4, 2  # latent dims (= 3 * S * S pixels), action dims, image size


class LinearWorld(torch.nn.Module):
    """z_{t+1} = M z_t + N a_t, z = the flattened image; one context frame."""

    context_frames = 1

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
        self.M = 0.9 * q  # stable
        self.N = torch.randn(D, A, generator=g) / A ** 0.5

    def encode_visual(self, obs):
        return obs.flatten(2)[:, :, None]  # (B, T, 1, D)

    def rollout(self, obs0, proprio0, actions, visual0=None):
        visual0 = self.encode_visual(obs0) if visual0 is None else visual0
        z = [visual0[:, i] for i in range(visual0.shape[1])]  # (B, 1, D) each
        for t in range(visual0.shape[1], actions.shape[1]):
            z.append(z[-1] @ self.M.T + actions[:, t - 1, None] @ self.N.T)
        return {"z": torch.stack(z, 1)}

    def decode(self, z, size=None):
        return z.reshape(*z.shape[:2], 3, S, S)

    def split(self, z):
        return z, None, None


def problem(horizon=2):
    world = LinearWorld()
    g = torch.Generator().manual_seed(2)
    obs0 = torch.randn(1, 3, S, S, generator=g)
    best = 0.5 * torch.randn(horizon, A, generator=g)
    goal = world.rollout(None, None, torch.cat([best, torch.zeros(1, A)])[None],
                         visual0=world.encode_visual(obs0[None]))["z"][0, -1]
    cost = GoalCost(world, Context(obs0, torch.zeros(1, 1), torch.zeros(0, A)), goal.reshape(3, S, S), None, A)
    return world, cost, best


def test_cost_is_zero_exactly_at_the_known_optimum():
    _, cost, best = problem()
    assert float(cost(best[None])) < 1e-10
    assert float(cost(torch.zeros(1, *best.shape))) > 1e-2


@pytest.mark.parametrize("method", ["cem", "gd"])
def test_planner_finds_the_optimum_of_a_linear_system(method):
    _, cost, best = problem()  # 12 equations, 8 unknowns: the optimum is unique
    settings = PlannerSettings(method=method, horizon=2, samples=300, elites=30, iterations=40 if method == "cem" else 300,
                               init_std=1.0, restarts=2, lr=0.05, hold=False, action_clip=3.0)
    out = Planner(settings, action_dim=A, frameskip=1).plan(cost)
    start = float(cost(torch.zeros(1, 2, A)))
    assert out["cost"] < 1e-3 * start
    torch.testing.assert_close(out["actions"], best, atol=0.05, rtol=0)
    assert out["ms"] > 0


def test_hold_repeats_one_action_over_the_frameskip_steps():
    _, cost, _ = problem()
    planner = Planner(PlannerSettings(samples=8, elites=2, iterations=1, hold=True), action_dim=A, frameskip=2)
    actions = planner.plan(cost, horizon=3)["actions"]
    assert actions.shape == (3, A)
    torch.testing.assert_close(actions[:, :2], actions[:, 2:])


@pytest.mark.parametrize("steps,execute,plans", [(5, 2, 3), (4, 1, 4), (3, 5, 1)])
def test_mpc_executes_exactly_the_step_budget(steps, execute, plans):
    world, cost, _ = problem()
    planner = Planner(PlannerSettings(horizon=3, samples=8, elites=2, iterations=1, hold=False), A, 1)
    executed, horizons = [], []
    original = planner.plan

    def plan(c, horizon=None, warm_start=None):
        horizons.append(horizon)
        return original(c, horizon=horizon, warm_start=warm_start)

    planner.plan = plan
    out = mpc_episode(planner, lambda: cost, lambda a: executed.append(a.shape[0]), steps, execute)
    assert sum(executed) == steps and out["executed"].shape == (steps, A)
    assert out["plans"] == plans == len(out["latency_ms"])
    assert horizons[0] == min(3, steps) and all(h <= 3 for h in horizons)


def test_bad_inputs_are_one_line_errors():
    world, cost, _ = problem()
    obs0 = torch.randn(1, 3, S, S)
    with pytest.raises(PlanError, match=r"goal image has shape \(3, 4, 4\).*\(3, 2, 2\)"):
        GoalCost(world, Context(obs0, torch.zeros(1, 1), torch.zeros(0, A)), torch.zeros(3, 4, 4), None, A)
    with pytest.raises(PlanError, match="context actions"):
        GoalCost(world, Context(obs0, torch.zeros(1, 1), torch.zeros(1, A)), torch.zeros(3, S, S), None, A)
    with pytest.raises(PlanError, match="no proprio part"):
        GoalCost(world, Context(obs0, torch.zeros(1, 1), torch.zeros(0, A)), torch.zeros(3, S, S), None, A,
                 proprio_weight=1.0)
    with pytest.raises(PlanError, match="elites"):
        PlannerSettings(samples=4, elites=8).validate()
    with pytest.raises(PlanError, match="multiple of frameskip"):
        Planner(PlannerSettings(), action_dim=9, frameskip=2)
    with pytest.raises(TypeError, match="not a world model"):
        GoalCost(torch.nn.Linear(2, 2), Context(obs0, torch.zeros(1, 1), torch.zeros(0, A)), obs0[0], None, A)
