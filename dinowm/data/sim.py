"""Generate simulated Franka cube-stacking data (MuJoCo) in the project's dataset format (docs/contract.md §1).

    python -m dinowm.data.sim --out data/sim --episodes 10 --frames 300 --seed 0      # shadows on
    python -m dinowm.data.sim --out data/demo --episodes 4 --frames 150 --no-shadows  # fast
    python -m dinowm.data.sim --eval-only 100 --frames 300                           # success rate, no images
    python -m dinowm.data.sim --preview data/sim --png sheet.png                     # contact sheet

Scene (sim_scene.py): a Franka Panda on a table, a red cube A and a green cube B placed at random,
one fixed 256x256 camera. Policy (sim_policy.py): scripted pick A / place on B with min-jerk
Cartesian waypoints and damped-least-squares IK, so actions are smooth joint-position targets.

Per frame t: state_t and image_t are recorded, then action a_t is applied for
`physics_steps_per_frame` physics steps of 2 ms (25 -> 20 Hz); a_t therefore leads to o_{t+1}.
After the last frame the scene settles for 0.5 s (not recorded) and the stack is checked.

    state  (22) = ee_pos(3) | ee_quat wxyz(4) | gripper width(1) | joint_pos(7) | joint_vel(7)
    action (9)  = joint position targets(7) | finger targets(2) in [0, 0.04] (0 = closed)

Joints are written in the real-robot convention by default (see sim_scene.REAL_JOINT_OFFSET).
Output is written to `<out>.tmp-<pid>` and renamed to `<out>` when complete, so an interrupted run
never leaves a folder that looks like a dataset. The same seed gives the same bytes.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dinowm.errors import UserError, run_cli
from dinowm.safe_pickle import load_pickle
from dinowm.data.sim_policy import ScriptedStacker, sample_cube_poses, sample_home_qpos
from dinowm.data.sim_scene import (
    CAMERA,
    IMAGE_SIZE,
    REAL_JOINT_OFFSET,
    TIMESTEP,
    FrankaCubeScene,
)

GENERATOR_NAME = "dinowm.data.sim"
SETTLE_SECONDS = 0.5  # after the episode, before the success check
DATASET_FILES = ("states.pth", "actions.pth", "seq_lengths.pkl", "metadata.pkl")
STATE_LAYOUT = {
    "ee_pos": (0, 3), "ee_quat": (3, 7), "gripper_width": (7, 8), "joint_pos": (8, 15), "joint_vel": (15, 22)
}
ACTION_LAYOUT = {"joint_targets": (0, 7), "finger_targets": (7, 9)}


class DatasetExistsError(UserError, RuntimeError):
    """The output folder is already taken."""


@dataclass
class Episode:
    states: np.ndarray  # (T, 22) float32
    actions: np.ndarray  # (T, 9) float32
    frames: np.ndarray | None  # (T, 256, 256, 3) uint8, None without rendering
    success: bool
    cube_poses: dict[str, tuple[float, float, float]]  # initial {name: (x, y, yaw)}


def run_episode(scene: FrankaCubeScene, seed: int, index: int, frames: int, render: bool, real_joints: bool = True,
                on_frame: Callable[[], object] | None = None) -> Episode:
    """One seeded episode; its randomness depends only on (seed, index). `on_frame` runs after each frame."""
    rng = np.random.default_rng([seed, index])
    cube_poses = sample_cube_poses(rng)
    home_qpos = sample_home_qpos(scene, rng)
    scene.reset(home_qpos, cube_poses)
    policy = ScriptedStacker(scene, rng, frames, home_qpos)
    joint_offset = np.concatenate([REAL_JOINT_OFFSET if real_joints else np.zeros(7), np.zeros(2)])
    states = np.empty((frames, 22), np.float32)
    actions = np.empty((frames, 9), np.float32)
    images = np.empty((frames, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) if render else None
    for t in range(frames):
        states[t] = scene.state(real_joints)
        if render:
            images[t] = scene.render()
        ctrl = policy.action(t)
        actions[t] = ctrl + joint_offset
        scene.step(ctrl)
        if on_frame is not None:
            on_frame()
    scene.step(ctrl, frames=round(SETTLE_SECONDS / scene.frame_dt))
    # Python floats: the metadata pickle then does not depend on numpy's pickling.
    poses = {name: tuple(float(v) for v in pose) for name, pose in cube_poses.items()}
    return Episode(states, actions, images, scene.success(), poses)


def is_complete_dataset(root: str | Path) -> bool:
    """All docs/contract.md §1 files exist (the contents are validated by the dataset loader)."""
    root = Path(root)
    if not all((root / name).is_file() for name in DATASET_FILES):
        return False
    try:
        episodes = len(load_pickle(root / "seq_lengths.pkl"))
    except Exception:
        return False
    return all((root / f"{i:06d}" / "obses.pth").is_file() for i in range(episodes))


def read_metadata(root: str | Path) -> dict:
    return load_pickle(Path(root) / "metadata.pkl")


def _metadata(generation: dict, episodes: list[Episode], physics_steps_per_frame: int, mujoco_version: str) -> dict:
    rate = 1.0 / (physics_steps_per_frame * TIMESTEP)
    success = [e.success for e in episodes]
    return {
        "generator": GENERATOR_NAME,
        "generation": generation,  # the parameters; ensure_demo_dataset reuses a dataset only if they match
        "task": "pick the red cube A and stack it on the green cube B",
        "robot": "Franka Panda (gymnasium-robotics 1.4.2 kitchen_franka model, MuJoCo)",
        "mujoco_version": mujoco_version,
        "seed": generation["seed"],
        "success": success,
        "success_rate": sum(success) / len(success),
        "initial_cube_poses": [e.cube_poses for e in episodes],
        "state_layout": STATE_LAYOUT,
        "action_layout": ACTION_LAYOUT,
        "quaternion_order": "wxyz",
        "ee_frame": "end_effector site of the model (5 cm above the fingertips), world frame, robot base at the origin",
        "gripper_width": "sum of the two finger joint positions (0 closed .. 0.08 open)",
        "finger_target_range": (0.0, 0.04),
        "joint_convention": generation["joint_convention"],
        "joint_offset_real_minus_sim": REAL_JOINT_OFFSET.tolist(),
        "units": {"position": "m", "angle": "rad", "joint_vel": "rad/s", "gripper_width": "m", "finger_targets": "m"},
        "timing": "state_t and image_t are recorded before action a_t is applied; a_t leads to o_{t+1}",
        "control_rate_hz": rate,
        "fps": rate,
        "physics_timestep": TIMESTEP,
        "physics_steps_per_frame": physics_steps_per_frame,
        "camera": {**CAMERA, "width": IMAGE_SIZE, "height": IMAGE_SIZE},
        "shadows": generation["shadows"],
    }


def generation_params(episodes: int, frames: int, seed: int, shadows: bool, physics_steps_per_frame: int,
                      joint_convention: str) -> dict:
    """What a generated dataset records in metadata["generation"] (the demo cache compares it)."""
    return {"episodes": episodes, "frames": frames, "seed": seed, "shadows": shadows,
            "physics_steps_per_frame": physics_steps_per_frame, "joint_convention": joint_convention}


def generate_dataset(
    out: str | Path,
    episodes: int,
    frames: int,
    seed: int = 0,
    shadows: bool = True,
    physics_steps_per_frame: int = 25,
    joint_convention: str = "real",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a complete dataset to `out` (see the module docstring); returns its path."""
    out = Path(out)
    if episodes < 1 or frames < 1 or physics_steps_per_frame < 1:
        raise UserError("episodes, frames and physics_steps_per_frame must be positive")
    if joint_convention not in ("real", "sim"):
        raise UserError(f"joint_convention must be 'real' or 'sim', got {joint_convention!r}")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        what = "a complete dataset" if is_complete_dataset(out) else "not empty" if out.is_dir() else "a file"
        raise DatasetExistsError(f"{out} is {what}; pass --overwrite (overwrite=True) to replace it")
    generation = generation_params(episodes, frames, seed, shadows, physics_steps_per_frame, joint_convention)
    scene = FrankaCubeScene(shadows=shadows, physics_steps_per_frame=physics_steps_per_frame)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run that had the same pid
        tmp.mkdir(parents=True)
        states = np.empty((episodes, frames, 22), np.float32)
        actions = np.empty((episodes, frames, 9), np.float32)
        recorded = []
        bar = tqdm(total=episodes * frames, unit="frame", desc=f"sim {out.name}", disable=not progress)
        for index in range(episodes):
            episode = run_episode(scene, seed, index, frames, render=True, real_joints=joint_convention == "real",
                                  on_frame=bar.update)
            states[index], actions[index] = episode.states, episode.actions
            (tmp / f"{index:06d}").mkdir()
            torch.save(torch.from_numpy(episode.frames), tmp / f"{index:06d}" / "obses.pth")
            episode.frames = None  # 196 KB per frame: keep only one episode in memory
            recorded.append(episode)
            bar.set_postfix(stacked=f"{sum(e.success for e in recorded)}/{len(recorded)}")
        bar.close()
        torch.save(torch.from_numpy(states), tmp / "states.pth")
        torch.save(torch.from_numpy(actions), tmp / "actions.pth")
        with open(tmp / "seq_lengths.pkl", "wb") as f:
            pickle.dump([frames] * episodes, f)
        metadata = _metadata(generation, recorded, physics_steps_per_frame, scene.mujoco.__version__)
        with open(tmp / "metadata.pkl", "wb") as f:
            pickle.dump(metadata, f)
        _move_into_place(tmp, out)
    finally:
        scene.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` is moved aside first and then deleted."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is None:
        return
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def ensure_demo_dataset(
    root: str | Path,
    episodes: int = 4,
    frames: int = 150,
    seed: int = 0,
    shadows: bool = False,
    physics_steps_per_frame: int = 25,
    progress: bool = True,
) -> Path:
    """The demo dataset at `root`, generated on first use (15-30 s for the defaults on 2 busy cores).

    Rendering loads Mesa's llvmpipe (its own LLVM) into the process; importing Triton afterwards in the
    same process crashes. Processes that use Triton (the trainer) run `python -m dinowm.data.sim --demo`
    as a child process instead (see `dinowm.data.build_data`).

    A complete dataset at `root` generated with the same parameters is reused. One generated by this
    module with other parameters is regenerated; any other existing folder is left alone (error)."""
    root = Path(root)
    generation = generation_params(episodes, frames, seed, shadows, physics_steps_per_frame, "real")
    ours = False
    if is_complete_dataset(root):
        metadata = read_metadata(root)
        if metadata.get("generation") == generation:
            return root
        ours = metadata.get("generator") == GENERATOR_NAME
    return generate_dataset(root, **generation, overwrite=ours, progress=progress)


def evaluate_policy(
    episodes: int, frames: int, seed: int = 0, physics_steps_per_frame: int = 25, progress: bool = True
) -> list[bool]:
    """Success of the scripted policy per episode, without rendering."""
    scene = FrankaCubeScene(physics_steps_per_frame=physics_steps_per_frame, render=False)
    success = []
    bar = tqdm(range(episodes), unit="episode", desc="eval", disable=not progress)
    for index in bar:
        success.append(run_episode(scene, seed, index, frames, render=False).success)
        bar.set_postfix(stacked=f"{sum(success)}/{len(success)}")
    return success


def contact_sheet(root: str | Path, png: str | Path, episodes: int = 4, columns: int = 8, gap: int = 4) -> Path:
    """A PNG grid: one row per episode (up to `episodes`), `columns` frames evenly spaced in time."""
    from PIL import Image, ImageDraw

    root = Path(root)
    if not is_complete_dataset(root):
        needed = ", ".join(DATASET_FILES)
        raise UserError(f"{root} is not a complete dataset (it needs {needed} and NNNNNN/obses.pth)")
    seq_lengths = load_pickle(root / "seq_lengths.pkl")
    rows = min(episodes, len(seq_lengths))
    size = IMAGE_SIZE
    sheet = Image.new("RGB", (columns * (size + gap) - gap, rows * (size + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    for row in range(rows):
        obses = torch.load(root / f"{row:06d}" / "obses.pth", mmap=True, weights_only=True)  # (T, H, W, 3)
        times = np.linspace(0, seq_lengths[row] - 1, columns).round().astype(int)
        for column, t in enumerate(times):
            x, y = column * (size + gap), row * (size + gap)
            sheet.paste(Image.fromarray(obses[t].numpy()).resize((size, size)), (x, y))
            draw.text((x + 4, y + 4), f"ep {row} t={t}", fill="white")
    png = Path(png)
    sheet.save(png)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dinowm.data.sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="dataset folder to create")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--frames", type=int, default=300, help="frames per episode (>= 120 to stack reliably)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shadows", action=argparse.BooleanOptionalAction, default=True,
                        help="shadowed key light (~4x slower rendering)")
    parser.add_argument("--physics-steps", type=int, default=25, help="2 ms physics steps per frame (25 -> 20 Hz)")
    parser.add_argument("--joint-convention", choices=("real", "sim"), default="real")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    parser.add_argument("--demo", action="store_true",
                        help="with --out: the cached demo dataset (no shadows), reused when already generated with "
                             "the same --episodes/--frames/--seed (what train.py runs for data.demo_episodes)")
    parser.add_argument("--eval-only", type=int, metavar="N",
                        help="run N episodes without rendering and report the success rate")
    parser.add_argument("--preview", type=Path, metavar="DIR", help="write a contact sheet of the dataset DIR to --png")
    parser.add_argument("--png", type=Path, default=Path("sheet.png"))
    args = parser.parse_args(argv)
    try:
        if args.preview is not None:
            print(f"wrote {contact_sheet(args.preview, args.png)}")
        elif args.eval_only is not None:
            success = evaluate_policy(args.eval_only, args.frames, args.seed, args.physics_steps)
            failed = [i for i, ok in enumerate(success) if not ok]
            print(f"success: {sum(success)}/{len(success)} = {100 * sum(success) / len(success):.1f}% "
                  f"({args.frames} frames, seed {args.seed}); failed episodes: {failed or 'none'}")
        elif args.out is not None and args.demo:
            out = ensure_demo_dataset(args.out, args.episodes, args.frames, args.seed,
                                      physics_steps_per_frame=args.physics_steps)
            print(f"demo dataset ready: {out}")
        elif args.out is not None:
            out = generate_dataset(args.out, args.episodes, args.frames, args.seed, args.shadows, args.physics_steps,
                                   args.joint_convention, args.overwrite)
            metadata = read_metadata(out)
            stacked = sum(metadata["success"])
            print(f"wrote {out}: {args.episodes} episodes x {args.frames} frames, stacked {stacked}/{args.episodes}")
        else:
            parser.error("give --out DIR, --eval-only N or --preview DIR")
    except KeyboardInterrupt:
        raise UserError("interrupted: the partial output was deleted, nothing was written to --out") from None


if __name__ == "__main__":
    run_cli(main)
