"""Planning with a world model: choose actions whose predicted future matches a goal image.

The objective of a candidate action sequence a (H model steps, each 9 * frameskip normalised values):

    z = rollout(context frames, [executed context actions, a, 0])      the final 0 only fills the last
                                                                        latent's action slot (never rolled)
    cost(a) = MSE(visual(z_last), visual(z_goal)) + proprio_weight * MSE(proprio(z_last), proprio(z_goal))

with z_goal the latent of the goal image (and goal proprio). Two optimisers of the cost:

- CEM (cross-entropy method): sample `samples` sequences from N(mu, sigma), keep the `elites` cheapest,
  refit mu, sigma to them; `iterations` times. All candidates are rolled out as one batch (in chunks
  of `chunk` when memory is short). mu starts at 0 (the dataset's mean action) or at a warm start.
- GD: Adam on the action sequence itself through the differentiable rollout, from `restarts` starting
  points at once (the warm start and random draws); the cheapest final sequence wins.

Actions live in the model's normalised space and are clamped to +-`action_clip` standard deviations.
With `hold` the planner optimises one 9-dim action per model step and repeats it over the frameskip
steps it spans (a joint target held for frameskip frames: 9 instead of 9 * frameskip unknowns per step).

MPC (`mpc_episode`): plan H steps, execute the first `execute` of them, observe, re-plan (warm-started
with the unexecuted rest of the last plan), until the step budget is spent. Every re-plan is timed.

Speed: all candidates of an iteration are one batched rollout (the AC family's rollout reuses past
frames' keys and values), under bf16 autocast when the planner's dtype says so, and nothing in an
iteration reads a value to the host (the best candidate and the cost trace stay on the device until
the re-plan ends). On CUDA, `graphs` (a CostGraphs) captures each cost evaluation (CEM: the batched rollout and
cost; GD: those plus the gradient with respect to the actions) into a CUDA graph once per shape and
replays it, with the candidates and the re-plan's context copied into the graph's static buffers: a
re-plan costs a few graph launches instead of thousands of kernel launches from Python. The first
re-plan of a shape pays the warm-up and the capture; plan() reports that apart (capture_ms), not in
its latency; one CostGraphs shared by every planner of a run replays from then on.

The model is only used through `dinowm.models.interface.WorldModel` (encode_visual / rollout / split).
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

from dinowm.errors import UserError
from dinowm.models.interface import WorldModel, check_world_model, encode_frames

log = logging.getLogger("dinowm")


class PlanError(UserError, ValueError):
    """Planner inputs that do not fit the model (shapes, settings), phrased for the user."""


@dataclass
class PlannerSettings:
    method: str = "cem"
    """'cem' or 'gd'."""
    horizon: int = 5
    """Model steps planned ahead (each frameskip frames)."""
    samples: int = 64
    """CEM: candidate sequences per iteration."""
    elites: int = 8
    """CEM: cheapest candidates the distribution is refitted to."""
    iterations: int = 5
    """CEM iterations / GD steps."""
    init_std: float = 1.0
    """CEM: initial standard deviation (normalised action units); GD: spread of the random restarts."""
    restarts: int = 4
    """GD: sequences optimised at once (the first from the warm start)."""
    lr: float = 0.1
    """GD: Adam learning rate."""
    proprio_weight: float = 0.0
    """Weight of the proprio term of the cost (0: the goal image alone)."""
    action_clip: float = 3.0
    """Normalised actions are clamped to +- this many standard deviations of the dataset."""
    hold: bool = True
    """Optimise one raw action per model step, held over its frameskip steps."""
    chunk: int = 0
    """Candidates rolled out per batch (0: all at once)."""
    seed: int = 0

    def validate(self) -> "PlannerSettings":
        if self.method not in ("cem", "gd"):
            raise PlanError(f"planner method {self.method!r} is not one of 'cem', 'gd'")
        for key in ("horizon", "samples", "elites", "iterations", "restarts"):
            if getattr(self, key) < 1:
                raise PlanError(f"planner {key} = {getattr(self, key)} must be >= 1")
        if self.elites > self.samples:
            raise PlanError(f"planner elites = {self.elites} must be <= samples = {self.samples}")
        if self.init_std <= 0 or self.lr <= 0 or self.action_clip <= 0:
            raise PlanError("planner init_std, lr and action_clip must be > 0")
        if self.proprio_weight < 0 or self.chunk < 0:
            raise PlanError("planner proprio_weight and chunk must be >= 0")
        return self


@dataclass
class Context:
    """What the planner knows at a re-plan: the last T0 <= num_hist observed frames and the actions
    executed between them. obs (T0, 3, S, S) in [-1, 1], proprio (T0, Dp) normalised,
    past_actions (T0 - 1, Da) normalised (the action after the last frame is what is planned)."""

    obs: torch.Tensor
    proprio: torch.Tensor
    past_actions: torch.Tensor


class GoalCost:
    """cost(actions (N, H, Da)) -> (N,) for a fixed context and goal; `predict` gives the final latents.

    Everything a cost depends on besides the model is in the tensors of `TENSORS` (what a CUDA graph of
    its evaluation reads): `clone` copies them, `load_` overwrites them in place with another cost's."""

    TENSORS = ("obs", "proprio", "past_actions", "visual", "goal_visual", "goal_proprio")

    def __init__(self, model: WorldModel, context: Context, goal_obs: torch.Tensor, goal_proprio: torch.Tensor | None,
                 action_dim: int, proprio_weight: float = 0.0):
        self.model = check_world_model(model)
        obs, proprio = context.obs, context.proprio
        if obs.dim() != 4 or obs.shape[1] != 3:
            raise PlanError(f"context frames must be (T, 3, S, S), got {tuple(obs.shape)}")
        if goal_obs.shape != obs.shape[1:]:
            raise PlanError(f"goal image has shape {tuple(goal_obs.shape)} but the model's frames are "
                            f"{tuple(obs.shape[1:])} (3, img_size, img_size); resize the goal to the model's image size")
        if context.past_actions.shape != (obs.shape[0] - 1, action_dim):
            raise PlanError(f"context actions must be ({obs.shape[0] - 1}, {action_dim}), got "
                            f"{tuple(context.past_actions.shape)}")
        self.action_dim = action_dim
        self.proprio_weight = proprio_weight
        with torch.no_grad():
            self.visual = model.encode_visual(obs[None])  # (1, T0, P, D)
            blank = torch.zeros(1, 1, action_dim, device=obs.device)
            goal_proprio = proprio[-1:] if goal_proprio is None else goal_proprio.reshape(1, -1)
            goal_z = encode_frames(model, goal_obs[None, None], goal_proprio[None], blank)  # (1, 1, ...)
            goal_visual, goal_prop, _ = model.split(goal_z.float())
        self.goal_visual = goal_visual[:, 0]  # (1, P, D)
        self.goal_proprio = None if goal_prop is None else goal_prop[:, 0]
        if proprio_weight > 0 and self.goal_proprio is None:
            raise PlanError("proprio_weight > 0 but this model's latents have no proprio part")
        self.obs, self.proprio, self.past_actions = obs, proprio, context.past_actions

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, name) for name in self.TENSORS}

    def clone(self) -> "GoalCost":
        """The same cost on copies of its tensors (the static buffers of a captured evaluation)."""
        other = copy.copy(self)
        for name, t in self.tensors().items():
            setattr(other, name, None if t is None else t.clone())
        return other

    def load_(self, other: "GoalCost") -> None:
        """Overwrite this cost's tensors in place with `other`'s (same model, same shapes)."""
        for name, t in self.tensors().items():
            if t is not None:
                t.copy_(getattr(other, name))

    def shapes(self) -> tuple:
        return tuple(None if t is None else tuple(t.shape) for t in self.tensors().values())

    def predict(self, actions: torch.Tensor) -> torch.Tensor:
        """actions (N, H, Da) -> final predicted latents (N, ...)."""
        n = actions.shape[0]
        past = self.past_actions[None].expand(n, -1, -1)
        blank = torch.zeros(n, 1, self.action_dim, device=actions.device, dtype=actions.dtype)
        full = torch.cat([past.to(actions.dtype), actions, blank], dim=1)  # (N, T0 - 1 + H + 1, Da)
        t0 = self.obs.shape[0]
        z = self.model.rollout(self.obs[None].expand(n, -1, -1, -1, -1), self.proprio[None].expand(n, -1, -1), full,
                               visual0=self.visual.expand(n, *self.visual.shape[1:]))["z"]
        assert z.shape[1] == t0 + actions.shape[1], "rollout must return the context plus one latent per action"
        return z[:, -1]

    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        visual, proprio, _ = self.model.split(self.predict(actions)[:, None].float())
        cost = (visual[:, 0] - self.goal_visual).pow(2).flatten(1).mean(1)
        if self.proprio_weight > 0:
            cost = cost + self.proprio_weight * (proprio[:, 0] - self.goal_proprio).pow(2).flatten(1).mean(1)
        return cost


def expand_hold(actions: torch.Tensor, frameskip: int) -> torch.Tensor:
    """(N, H, 9) held actions -> (N, H, 9 * frameskip) (the same raw action at every skipped step)."""
    return actions.repeat(1, 1, frameskip)


class CostGraphs:
    """CUDA graphs of the planner's cost evaluations (Planner(graphs=...)), one per evaluation and shape
    (candidates, context, goal) and model: the first call of a shape runs the evaluation WARMUP times on a
    side stream (kernel autotuning, cached layouts, cuBLAS workspaces) and captures it, with a clone of
    the cost and of the candidates as static buffers. Every call copies its candidates and its cost's
    tensors (a new GoalCost per re-plan) into those buffers and replays; returns copies of the outputs.
    One instance may serve many planners (e.g. one per episode): each shape is captured once."""

    WARMUP = 2

    def __init__(self, device):
        if torch.device(device).type != "cuda":
            raise PlanError(f"CUDA graphs need a CUDA device, and the planner runs on {device}; plan without "
                            f"--cuda-graphs (or with --device cuda on a GPU)")
        self.graphs: dict[tuple, tuple] = {}  # key -> graph, static cost, static candidates, static outputs
        self.capture_s = 0.0  # time spent warming up and capturing (kept out of the re-plan latency)

    def __call__(self, evaluate, cost: GoalCost, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (evaluate.__name__, tuple(x.shape), cost.shapes(), id(cost.model), cost.action_dim,
               cost.proprio_weight)  # the Python values a capture bakes in
        if key not in self.graphs:
            start = time.perf_counter()
            self.graphs[key] = self._capture(evaluate, cost, x)
            torch.cuda.synchronize(x.device)
            self.capture_s += time.perf_counter() - start
        graph, static_cost, static_x, out = self.graphs[key]
        static_cost.load_(cost)
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        return tuple(t.clone() for t in out)

    def _capture(self, evaluate, cost: GoalCost, x: torch.Tensor) -> tuple:
        static_cost, static_x = cost.clone(), x.detach().clone().requires_grad_(x.requires_grad)
        stream = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                evaluate(static_cost, static_x)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = evaluate(static_cost, static_x)
        log.info("planner: %s of %d candidates x %d steps captured into a CUDA graph", evaluate.__name__,
                 x.shape[0], x.shape[1])
        return graph, static_cost, static_x, out


class Planner:
    """Optimises H-step action sequences (normalised, (H, Da)) for a GoalCost with CEM or GD.

    dtype: bf16 runs the rollouts under autocast; graphs: a CostGraphs to replay the cost evaluations
    from (CUDA)."""

    def __init__(self, settings: PlannerSettings, action_dim: int, frameskip: int, device="cpu",
                 dtype: torch.dtype = torch.float32, graphs: CostGraphs | None = None):
        self.s = settings.validate()
        self.action_dim = action_dim
        self.frameskip = frameskip
        if action_dim % frameskip:
            raise PlanError(f"action dim {action_dim} is not a multiple of frameskip {frameskip}")
        self.var_dim = action_dim // frameskip if settings.hold else action_dim
        self.device = torch.device(device)
        self.graphs = graphs
        self.dtype = dtype
        self.generator = torch.Generator(device="cpu").manual_seed(settings.seed)

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(-self.s.action_clip, self.s.action_clip)
        return expand_hold(x, self.frameskip) if self.s.hold else x

    def _randn(self, *shape) -> torch.Tensor:
        noise = torch.randn(*shape, generator=self.generator)  # the seeded CPU stream: the same plans anywhere
        if self.device.type == "cuda":  # from pageable memory the copy would wait for the device
            return noise.pin_memory().to(self.device, non_blocking=True)
        return noise

    def _autocast(self):
        # a captured evaluation must not keep autocast's cache of cast weights (it would hold the capture's)
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                              cache_enabled=self.graphs is None)

    def costs(self, cost: GoalCost, x: torch.Tensor) -> tuple[torch.Tensor]:
        """(costs (N,) fp32,) of candidates x (N, H, var_dim), without gradients."""
        with torch.no_grad(), self._autocast():
            return (cost(self._full(x)).float(),)

    def costs_and_gradients(self, cost: GoalCost, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(costs (N,), d sum(costs) / d x) of candidates x (N, H, var_dim) that require grad."""
        with torch.enable_grad(), self._autocast():
            costs = cost(self._full(x)).float()
        if not costs.requires_grad:
            raise PlanError(f"{type(cost.model).__name__}.rollout is not differentiable: plan with CEM (--method cem)")
        (grad,) = torch.autograd.grad(costs.sum(), x)  # only the actions: the model's parameters stay untouched
        return costs.detach(), grad

    def _evaluate(self, evaluate, cost: GoalCost, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return evaluate(cost, x) if self.graphs is None else self.graphs(evaluate, cost, x)

    def _batched_costs(self, cost: GoalCost, x: torch.Tensor) -> torch.Tensor:
        chunk = self.s.chunk or x.shape[0]
        return torch.cat([self._evaluate(self.costs, cost, x[i:i + chunk])[0] for i in range(0, x.shape[0], chunk)])

    def plan(self, cost: GoalCost, horizon: int | None = None, warm_start: torch.Tensor | None = None) -> dict:
        """-> {"actions": (H, Da) normalised, "cost": float, "ms": latency of this re-plan, "trace": [cost/iter]}."""
        h = horizon or self.s.horizon
        mu = torch.zeros(h, self.var_dim, device=self.device)
        if warm_start is not None:
            k = min(h, warm_start.shape[0])
            mu[:k] = warm_start[:k].to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t, captured = time.perf_counter(), self._capture_s()
        best, trace = self._cem(cost, mu) if self.s.method == "cem" else self._gd(cost, mu)
        trace = torch.stack(trace).tolist()  # the re-plan's one host read; trace[-1] is the best cost
        capture_ms = (self._capture_s() - captured) * 1e3  # first use of a shape: warm-up and CUDA-graph capture
        ms = (time.perf_counter() - t) * 1e3 - capture_ms
        return {"actions": self._full(best[None])[0], "raw": best.clamp(-self.s.action_clip, self.s.action_clip),
                "cost": trace[-1], "ms": ms, "capture_ms": capture_ms, "trace": trace}

    def _capture_s(self) -> float:
        return self.graphs.capture_s if self.graphs is not None else 0.0

    def _cem(self, cost: GoalCost, mu: torch.Tensor):
        s = self.s
        sigma = torch.full_like(mu, s.init_std)
        best, best_cost, trace = mu, torch.full((), float("inf"), device=mu.device), []
        noise = self._randn(s.iterations, s.samples, *mu.shape)  # one copy to the device per re-plan
        for i in range(s.iterations):
            x = mu[None] + sigma[None] * noise[i]  # (N, H, d)
            x[0] = mu  # the current mean is always a candidate
            x = x.clamp(-s.action_clip, s.action_clip)
            costs, order = torch.sort(self._batched_costs(cost, x))  # (N,): no value leaves the device
            elite = x.index_select(0, order[:s.elites])
            mu, sigma = elite.mean(0), elite.std(0, correction=0) + 1e-3
            best = torch.where(costs[0] < best_cost, elite[0], best)
            best_cost = torch.minimum(costs[0], best_cost)
            trace.append(best_cost)
        return best, trace

    def _gd(self, cost: GoalCost, mu: torch.Tensor):
        s = self.s
        x = mu[None] + s.init_std * self._randn(s.restarts, *mu.shape)
        x[0] = mu
        x = x.clamp(-s.action_clip, s.action_clip).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=s.lr)
        trace = []
        for _ in range(s.iterations):
            costs, x.grad = self._evaluate(self.costs_and_gradients, cost, x)  # (R,), (R, H, d)
            opt.step()
            with torch.no_grad():
                x.clamp_(-s.action_clip, s.action_clip)
            trace.append(costs.min())
        final, i = self._batched_costs(cost, x.detach()).min(0)
        trace.append(final)
        return x.detach().index_select(0, i[None])[0], trace


def mpc_episode(planner: Planner, make_cost, execute_fn, steps: int, execute: int = 1) -> dict:
    """Model-predictive control for `steps` model steps.

    make_cost() -> GoalCost for the current observation; execute_fn(actions (k, Da) normalised) applies
    them to the system (and records what the next make_cost sees). Each round plans
    min(horizon, steps left) steps and executes the first min(execute, steps left).
    Returns {"executed": (steps, Da), "plans": number of re-plans, "latency_ms": [...], "costs": [...]}.
    """
    if execute < 1:
        raise PlanError(f"MPC execute = {execute} must be >= 1")
    done, executed, costs, latency, warm = 0, [], [], [], None
    while done < steps:
        left = steps - done
        result = planner.plan(make_cost(), horizon=min(planner.s.horizon, left), warm_start=warm)
        k = min(execute, left)
        execute_fn(result["actions"][:k])
        executed.append(result["actions"][:k])
        warm = result["raw"][k:]
        done += k
        costs.append(result["cost"])
        latency.append(result["ms"])
    return {"executed": torch.cat(executed), "plans": len(latency), "latency_ms": latency, "costs": costs}
