"""Plan with a trained world model: in the model on held-out data, or closed loop in the Franka simulator.

    python -m dinowm.plan runs/demo                         # open loop on validation windows of the dataset
    python -m dinowm.plan runs/demo --sim --episodes 4      # closed loop (MPC) in the MuJoCo Franka scene
    python -m dinowm.plan runs/demo --sim --method gd --horizon 4 --samples 32 --iterations 4

Open loop (default): from each validation window, the context is its first num_hist frames and the goal
its last frame, `--goal-steps` model steps later. The planner's final predicted latent is compared with
the goal's, against the dataset's own actions and random actions rolled out the same way.

Closed loop (`--sim`), a goal-reaching task in the simulated scene (held-out seeds, not the dataset's):
  - start: a scripted stacking episode run for a random number of frames (the last num_hist frames,
    every frameskip-th, are the planner's context);
  - goal: the image (and end-effector position) the scripted policy reaches `--goal-steps` model steps
    (goal_steps * frameskip frames) later;
  - the planner acts through the joint-target actions for exactly those goal_steps model steps, by MPC:
    plan `--horizon` steps, execute `--execute`, observe, re-plan;
  - success: the end effector ends within `--success-cm` of the goal position; the cubes stacked at the
    end is reported too (the harder variant `--task stack`: start at frame 0, goal = the stacked end).
Baselines in the same run, from the same start: random actions (drawn as the planner's first proposal,
N(0, 1) in normalised units, held per model step) and replaying the scripted actions (an upper
reference). Writes <run>/plan/ (or --out): results.json and one contact sheet per episode.

Latency: milliseconds per re-plan (samples x horizon as set) are reported for every method. On a GPU,
`--device cuda --dtype bf16 --cuda-graphs` is the fast path (bf16 rollouts, cost evaluations replayed
from CUDA graphs, as the training step does); on CPU, `--dtype bf16` pays where the CPU has AVX-512 BF16
or AMX (bench/bench_plan.py measures it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
from pathlib import Path

import torch

from dinowm.data import FrameWindows, build_data, preprocess_images
from dinowm.errors import run_cli
from dinowm.eval import load_run
from dinowm.planner import (Context, CostGraphs, GoalCost, PlanError, Planner, PlannerSettings, expand_hold,
                           mpc_episode)
from dinowm.visualize import save_grid

log = logging.getLogger("dinowm")
TASK_SEED = 1000  # simulator episodes for planning use seeds the demo dataset (seed 0) never used


def settings_from_args(args, method: str) -> PlannerSettings:
    return PlannerSettings(method=method, horizon=args.horizon, samples=args.samples, elites=args.elites,
                           iterations=args.iterations, init_std=args.init_std, restarts=args.restarts, lr=args.lr,
                           proprio_weight=args.proprio_weight, action_clip=args.action_clip, hold=not args.no_hold,
                           seed=args.seed).validate()


def latency_summary(ms: list[float]) -> dict:
    return {"mean_ms": statistics.fmean(ms), "median_ms": statistics.median(ms), "replans": len(ms)} if ms else {}


# ----------------------------------------------------------------------------------------------
# open loop on dataset windows
# ----------------------------------------------------------------------------------------------
def plan_on_dataset(model, cfg, stats, args, methods, device) -> dict:
    data = build_data(cfg.data, stats=stats)
    n, fs = model.context_frames, cfg.data.frameskip
    windows = FrameWindows(data.dataset, data.val_ids, n + args.goal_steps, fs, stats, data.proprio_slice,
                           allow_empty=True)
    if len(windows) == 0:
        raise PlanError(f"{cfg.data.path}: no validation window of {n + args.goal_steps} frames (frameskip {fs}); "
                        f"lower --goal-steps")
    idx = torch.linspace(0, len(windows) - 1, min(args.episodes, len(windows))).round().long()
    batch = windows.batch(idx)
    obs = preprocess_images(batch["obs"], cfg.data.img_size).to(device)  # (B, n + G, 3, S, S)
    proprio, action = batch["proprio"].to(device), batch["action"].to(device)
    da = action.shape[-1]
    rows = []
    results = {m: [] for m in methods + ["dataset_actions", "random"]}
    latency = {}
    for i in range(len(idx)):
        ctx = Context(obs[i, :n], proprio[i, :n], action[i, :n - 1])
        cost = GoalCost(model, ctx, obs[i, -1], proprio[i, -1], da, args.proprio_weight)
        true_actions = action[i, n - 1:n - 1 + args.goal_steps]
        random = torch.randn(args.samples, args.goal_steps, da // fs if not args.no_hold else da,
                             generator=torch.Generator().manual_seed(args.seed + i)).to(device).clamp(-args.action_clip,
                                                                                                       args.action_clip)
        random = expand_hold(random, fs) if not args.no_hold else random
        with torch.no_grad():
            results["dataset_actions"].append(float(cost(true_actions[None])[0]))
            results["random"].append(float(cost(random).mean()))
        for m in methods:
            planner = Planner(settings_from_args(args, m), da, fs, device, args.torch_dtype, args.graphs)
            out = planner.plan(cost, horizon=args.goal_steps)
            results[m].append(out["cost"])
            latency.setdefault(m, []).append(out["ms"])
        rows.append(int(batch["start"][i]))
    summary = {k: statistics.fmean(v) for k, v in results.items()}
    return {"mode": "dataset", "windows": rows, "episodes_of_windows": batch["episode"].tolist(),
            "final_latent_cost": results, "mean_final_latent_cost": summary,
            "latency": {m: latency_summary(v) for m, v in latency.items()}}


# ----------------------------------------------------------------------------------------------
# closed loop in the simulator
# ----------------------------------------------------------------------------------------------
class SimTask:
    """One goal-reaching task: a reproducible start state, goal image/position, the scripted actions."""

    def __init__(self, scene, index: int, episode_frames: int, num_hist: int, frameskip: int, goal_steps: int,
                 task: str, stats, img_size: int, proprio_slice: slice):
        import numpy as np

        self.np = np
        self.scene, self.index, self.frames = scene, index, episode_frames
        self.n, self.fs, self.goal_steps = num_hist, frameskip, goal_steps
        self.stats, self.img_size, self.proprio_slice = stats, img_size, proprio_slice
        goal_frames = goal_steps * frameskip
        earliest = (num_hist - 1) * frameskip
        rng = np.random.default_rng([TASK_SEED, index, 1])
        if task == "stack":
            self.t0 = earliest
            goal_frames = episode_frames - self.t0 - 1
            self.goal_steps = goal_steps = goal_frames // frameskip
            goal_frames = goal_steps * frameskip
        else:
            latest = episode_frames - goal_frames - 1
            if latest < earliest:
                raise PlanError(f"--goal-steps {goal_steps} x frameskip {frameskip} does not fit an episode of "
                                f"{episode_frames} frames after {earliest} context frames; lower --goal-steps")
            self.t0 = int(rng.integers(earliest, latest + 1))
        # run once: context observations, the goal, the scripted actions
        policy = self.reset()
        context_t = {self.t0 - k * frameskip for k in range(num_hist)}
        self.context_obs, self.context_state, actions = [], [], []
        for t in range(self.t0 + goal_frames):
            if t in context_t:
                self.context_obs.append(self.observe())
                self.context_state.append(scene.state())
            ctrl = policy.action(t)
            if t >= self.t0 - (num_hist - 1) * frameskip:
                actions.append(ctrl + self.joint_offset)
            scene.step(ctrl)
        self.goal_image = self.observe()
        self.goal_state = scene.state()
        actions = np.stack(actions)  # (n - 1 + G) * fs raw actions (real convention), from the first context frame
        k = (num_hist - 1) * frameskip
        self.context_actions = actions[:k]
        self.scripted_actions = actions[k:]  # (G * fs, 9)

    @property
    def joint_offset(self):
        from dinowm.data.sim_scene import REAL_JOINT_OFFSET

        return self.np.concatenate([REAL_JOINT_OFFSET, self.np.zeros(2)])

    def reset(self):
        """Reset to the episode start and run the scripted policy to frame t0 (deterministic); returns the policy."""
        from dinowm.data.sim_policy import ScriptedStacker, sample_cube_poses, sample_home_qpos

        np = self.np
        rng = np.random.default_rng([TASK_SEED, self.index])
        cube_poses = sample_cube_poses(rng)
        home = sample_home_qpos(self.scene, rng)
        self.scene.reset(home, cube_poses)
        return ScriptedStacker(self.scene, rng, self.frames, home)

    def start(self):
        """The scene at frame t0 (as when the task was made)."""
        policy = self.reset()
        for t in range(self.t0):
            self.scene.step(policy.action(t))

    def observe(self):
        return torch.from_numpy(self.scene.render().copy())  # (256, 256, 3) uint8

    def model_obs(self, frames: torch.Tensor) -> torch.Tensor:
        return preprocess_images(frames, self.img_size)

    def model_proprio(self, states) -> torch.Tensor:
        s = torch.as_tensor(self.np.stack(states), dtype=torch.float32)[:, self.proprio_slice]
        return self.stats.normalize_proprio(s)

    def normalized_steps(self, raw) -> torch.Tensor:
        """(k * fs, 9) raw real-convention actions -> (k, 9 * fs) normalised model actions."""
        a = self.stats.normalize_action(torch.as_tensor(raw, dtype=torch.float32))
        return a.reshape(-1, self.fs * a.shape[-1])

    def apply(self, model_actions: torch.Tensor) -> None:
        """(k, 9 * fs) normalised -> k * fs raw actions applied frame by frame."""
        raw = self.stats.denormalize_action(model_actions.detach().float().cpu().reshape(-1, 9)).numpy()
        for a in raw:
            self.scene.step(a - self.joint_offset)

    def distance(self) -> float:
        return float(self.np.linalg.norm(self.scene.state()[:3] - self.goal_state[:3]))


def run_controller(task: SimTask, name: str, planner: Planner | None, model, device, args) -> dict:
    """One controller from the task's start for task.goal_steps model steps; records a frame per model step."""
    fs, n = task.fs, task.n
    task.start()
    frames = [task.observe()]
    obs_hist = list(task.context_obs)
    state_hist = list(task.context_state)
    act_hist = list(task.normalized_steps(task.context_actions)) if n > 1 else []
    goal_obs = task.model_obs(task.goal_image).to(device)
    goal_proprio = task.model_proprio([task.goal_state])[0].to(device)
    da = 9 * fs

    def step_and_record(actions: torch.Tensor) -> None:
        for a in actions:
            task.apply(a[None])
            act_hist.append(a.detach().cpu())
            frames.append(task.observe())
            obs_hist.append(frames[-1])
            state_hist.append(task.scene.state())

    info = {}
    if name == "replay":
        step_and_record(task.normalized_steps(task.scripted_actions))
    elif name == "random":
        g = torch.Generator().manual_seed(args.seed + task.index)
        shape = (task.goal_steps, 9) if not args.no_hold else (task.goal_steps, da)
        random = torch.randn(*shape, generator=g).clamp(-args.action_clip, args.action_clip)
        step_and_record(expand_hold(random[None], fs)[0] if not args.no_hold else random)
    else:
        def make_cost():
            ctx = Context(task.model_obs(torch.stack(obs_hist[-n:])).to(device),
                          task.model_proprio(state_hist[-n:]).to(device),
                          torch.stack(act_hist[len(act_hist) - (n - 1):]).to(device) if n > 1
                          else torch.zeros(0, da, device=device))
            return GoalCost(model, ctx, goal_obs, goal_proprio, da, args.proprio_weight)

        out = mpc_episode(planner, make_cost, step_and_record, task.goal_steps, args.execute)
        info = {"replans": out["plans"], "latency": latency_summary(out["latency_ms"]),
                "predicted_costs": out["costs"]}
    distance = task.distance()
    return {"final_distance_m": distance, "success": distance < args.success_cm / 100, "stacked": task.scene.success(),
            "frames": frames, **info}


def plan_in_sim(model, cfg, stats, args, methods, device, out: Path) -> dict:
    if importlib.util.find_spec("triton") is not None:
        # Mesa's llvmpipe (rendering) brings its own LLVM; Triton imported after it segfaults. Load Triton first.
        import triton  # noqa: F401
    from dinowm.data.sim_scene import FrankaCubeScene

    scene = FrankaCubeScene(shadows=False, physics_steps_per_frame=25)  # SimSetupError: what to install
    n, fs = model.context_frames, cfg.data.frameskip
    proprio_slice = slice(cfg.data.proprio_start, cfg.data.proprio_end)
    controllers = methods + ["random", "replay"]
    episodes = []
    try:
        for e in range(args.episodes):
            task = SimTask(scene, e, args.episode_frames, n, fs, args.goal_steps, args.task, stats,
                           cfg.data.img_size, proprio_slice)
            record = {"episode": e, "t0": task.t0, "goal_steps": task.goal_steps,
                      "goal_position": task.goal_state[:3].tolist()}
            rows, labels = [], []
            for name in controllers:
                planner = Planner(settings_from_args(args, name), 9 * fs, fs, device, args.torch_dtype,
                                  args.graphs) if name in methods else None
                result = run_controller(task, name, planner, model, device, args)
                rows.append(preprocess_images(torch.stack(result.pop("frames")), args.sheet_px))
                labels.append(f"{name} {100 * result['final_distance_m']:.1f} cm")
                record[name] = result
                log.info("episode %d %s: final distance %.1f cm%s", e, name, 100 * result["final_distance_m"],
                         f", {result['latency']['mean_ms']:.0f} ms per re-plan" if "latency" in result else "")
            goal = preprocess_images(task.goal_image, args.sheet_px)[None]
            start = rows[0][:1]
            rows.insert(0, torch.cat([start, torch.ones_like(rows[0][1:-1]), goal]))
            labels.insert(0, "start ... goal")
            save_grid(rows, out / f"episode_{e:03d}.png", labels,
                      [f"step {k} (t+{k * fs})" for k in range(rows[1].shape[0])],
                      title=f"episode {e}: reach the goal in {task.goal_steps} model steps "
                            f"(success < {args.success_cm:g} cm)")
            episodes.append(record)
    finally:
        scene.close()
    summary = {}
    for name in controllers:
        rs = [ep[name] for ep in episodes]
        summary[name] = {"success_rate": sum(r["success"] for r in rs) / len(rs),
                         "mean_final_distance_cm": 100 * statistics.fmean(r["final_distance_m"] for r in rs),
                         "stacked_rate": sum(r["stacked"] for r in rs) / len(rs)}
        if name in methods:
            ms = [m for r in rs for m in [r["latency"]["mean_ms"]] * r["replans"]]
            summary[name]["latency"] = latency_summary(ms)
    return {"mode": "sim", "task": args.task, "success_cm": args.success_cm, "episodes": episodes, "summary": summary}


def print_summary(result: dict, args) -> None:
    shape = f"{args.samples} samples x {args.horizon} steps, {args.iterations} iterations"
    if result["mode"] == "sim":
        print(f"closed loop, {len(result['episodes'])} episodes, success = end effector within "
              f"{args.success_cm:g} cm of the goal after {args.goal_steps} model steps")
        print(f"{'controller':>12}  {'success':>8}  {'distance cm':>11}  {'stacked':>7}  {'ms/re-plan':>10}")
        for name, s in result["summary"].items():
            ms = f"{s['latency']['mean_ms']:.0f}" if "latency" in s else "-"
            print(f"{name:>12}  {100 * s['success_rate']:7.0f}%  {s['mean_final_distance_cm']:11.1f}  "
                  f"{100 * s['stacked_rate']:6.0f}%  {ms:>10}")
    else:
        print(f"open loop on {len(result['windows'])} validation windows: final predicted latent cost (lower is better)")
        for name, v in result["mean_final_latent_cost"].items():
            ms = result["latency"].get(name, {}).get("mean_ms")
            print(f"{name:>16}  {v:.4f}" + (f"   {ms:.0f} ms/re-plan" if ms is not None else ""))
    print(f"planner: {shape} (CEM {args.elites} elites; GD {args.restarts} restarts)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dinowm.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder or checkpoint file written by train.py")
    parser.add_argument("--sim", action="store_true", help="closed loop in the MuJoCo Franka scene")
    parser.add_argument("--episodes", type=int, default=4, help="sim episodes (or dataset windows)")
    parser.add_argument("--method", choices=("cem", "gd", "both"), default="both")
    parser.add_argument("--task", choices=("reach", "stack"), default="reach")
    d = PlannerSettings()
    parser.add_argument("--horizon", type=int, default=d.horizon)
    parser.add_argument("--samples", type=int, default=d.samples)
    parser.add_argument("--elites", type=int, default=d.elites)
    parser.add_argument("--iterations", type=int, default=d.iterations)
    parser.add_argument("--init-std", type=float, default=d.init_std)
    parser.add_argument("--restarts", type=int, default=d.restarts)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--proprio-weight", type=float, default=d.proprio_weight)
    parser.add_argument("--action-clip", type=float, default=d.action_clip)
    parser.add_argument("--no-hold", action="store_true", help="optimise all 9 x frameskip values per model step")
    parser.add_argument("--execute", type=int, default=1, help="MPC: model steps executed per re-plan")
    parser.add_argument("--goal-steps", type=int, default=5, help="the goal is this many model steps ahead")
    parser.add_argument("--episode-frames", type=int, default=150, help="sim: frames of the scripted episode")
    parser.add_argument("--success-cm", type=float, default=5.0)
    parser.add_argument("--sheet-px", type=int, default=128, help="contact sheet tile size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: rollouts under autocast")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA: replay each cost evaluation from a CUDA graph captured once per shape")
    parser.add_argument("--out", help="output folder (default <run>/plan)")
    args = parser.parse_args(argv)
    args.torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    methods = ["cem", "gd"] if args.method == "both" else [args.method]
    src = Path(args.checkpoint)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent.parent) / "plan"
    if args.episodes < 1 or args.goal_steps < 1 or args.execute < 1:
        raise PlanError("--episodes, --goal-steps and --execute must be >= 1")
    settings_from_args(args, methods[0])
    args.graphs = CostGraphs(args.device) if args.cuda_graphs else None  # shared by every planner of the run
    model, cfg, stats, _ = load_run(args.checkpoint, device=args.device)
    model.requires_grad_(False)  # planning differentiates with respect to the actions only
    out.mkdir(parents=True, exist_ok=True)
    if args.sim:
        result = plan_in_sim(model, cfg, stats, args, methods, args.device, out)
    else:
        result = plan_on_dataset(model, cfg, stats, args, methods, args.device)
    result["planner"] = {k: v for k, v in vars(args).items() if k not in ("torch_dtype", "graphs")}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    print_summary(result, args)
    print(f"wrote {out / 'results.json'}" + (f" and {len(result['episodes'])} contact sheets in {out}"
                                              if args.sim else ""))
    return result


if __name__ == "__main__":
    run_cli(main)
