"""The MuJoCo Franka cube-stacking generator (dinowm.data.sim): format, determinism, semantics.

Two small datasets (2 episodes x 64 frames, no shadows) are generated once per module: one through
`ensure_demo_dataset`, one through the CLI with the same seed. At 64 frames the policy is too rushed to
stack every time; stacking itself is measured by `python -m dinowm.data.sim --eval-only 100`.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from dinowm.data import sim, sim_scene
from dinowm.data.dataset import load_franka_dataset
from dinowm.data.sim_scene import CUBE_HALF, REAL_JOINT_OFFSET, choose_gl_backend, cubes_stacked

choose_gl_backend()  # MUJOCO_GL must be set before mujoco is imported
if importlib.util.find_spec("mujoco") is None:
    pytest.skip(f"mujoco is not installed (install with: {sim_scene.PIP_SIM_HINT})", allow_module_level=True)

EPISODES, FRAMES, SEED = 2, 64, 3


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim") / "demo"
    return sim.ensure_demo_dataset(root, episodes=EPISODES, frames=FRAMES, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def dataset(dataset_root):
    return load_franka_dataset(dataset_root)


@pytest.fixture(scope="module")
def scene():
    scene = sim_scene.FrankaCubeScene(render=False)
    yield scene
    scene.close()


def test_loads_with_the_project_loader(dataset):
    assert dataset.states.shape == (EPISODES, FRAMES, 22) and dataset.states.dtype == torch.float32
    assert dataset.actions.shape == (EPISODES, FRAMES, 9) and dataset.actions.dtype == torch.float32
    assert dataset.seq_lengths == [FRAMES] * EPISODES
    assert dataset.frames.shape == (EPISODES * FRAMES, 256, 256, 3) and dataset.frames.dtype == torch.uint8
    assert dataset.frame_offsets.tolist() == [0, FRAMES, 2 * FRAMES]
    meta = dataset.metadata
    assert len(meta["success"]) == EPISODES and all(isinstance(s, bool) for s in meta["success"])
    assert meta["quaternion_order"] == "wxyz" and meta["joint_convention"] == "real"
    assert meta["control_rate_hz"] == pytest.approx(20.0) and meta["seed"] == SEED
    assert meta["camera"]["width"] == 256 and meta["state_layout"]["joint_vel"] == (15, 22)


def test_same_seed_gives_the_same_bytes(dataset_root, tmp_path):
    again = tmp_path / "again"
    sim.main(["--out", str(again), "--episodes", str(EPISODES), "--frames", str(FRAMES), "--seed", str(SEED),
              "--no-shadows"])
    names = [*sim.DATASET_FILES, *(f"{i:06d}/obses.pth" for i in range(EPISODES))]
    for name in names:
        assert (again / name).read_bytes() == (dataset_root / name).read_bytes(), name


def test_frames_show_a_scene_that_moves(dataset):
    for i in range(EPISODES):
        frames = dataset.episode_frames(i).float()  # (T, 256, 256, 3)
        assert frames.std() > 20, "frame looks blank"
        change = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))  # (T - 1,)
        assert (change > 0).float().mean() > 0.8, "the arm should move in most frames"
        assert (frames[-1] - frames[0]).abs().mean() > 1.0


def test_state_and_action_semantics(dataset, scene):
    states, actions = dataset.states.numpy(), dataset.actions.numpy()
    assert np.allclose(np.linalg.norm(states[..., 3:7], axis=-1), 1.0, atol=1e-5)  # unit quaternions
    assert ((states[..., 7] >= -1e-3) & (states[..., 7] <= 0.08 + 1e-3)).all()  # gripper width
    # state_0 is recorded before any action: the arm is still at rest.
    assert np.abs(states[:, 0, 15:22]).max() < 1e-6
    fingers = actions[..., 7:]
    assert ((fingers >= 0.0) & (fingers <= 0.04)).all()
    assert fingers.min() < 0.01 and fingers.max() == pytest.approx(0.04)  # the gripper closes and opens
    low, high = scene.model.actuator_ctrlrange[:7].T + REAL_JOINT_OFFSET  # real-robot convention
    assert ((actions[..., :7] >= low - 1e-5) & (actions[..., :7] <= high + 1e-5)).all()
    # The ee pose is the forward kinematics of the recorded (real-convention) joints.
    scene.data.qpos[scene.arm_qpos_ids] = states[0, 10, 8:15] - REAL_JOINT_OFFSET
    scene.mujoco.mj_kinematics(scene.model, scene.data)
    assert np.allclose(scene.data.site_xpos[scene.site_id], states[0, 10, :3], atol=1e-4)


def test_success_check_on_constructed_poses(scene):
    arm = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 0.0, 0.0])  # ready posture, far above the cubes
    scene.reset(arm, {"cube_a": (0.5, -0.15, 0.0), "cube_b": (0.5, 0.1, 0.3)})
    scene.step(scene.data.ctrl.copy(), frames=10)
    assert not scene.success(), "side by side is not a stack"
    scene.set_cube("cube_a", (0.5, 0.1, 3 * CUBE_HALF + 0.001), 0.3)  # resting on B, same yaw
    scene.step(scene.data.ctrl.copy(), frames=10)
    assert scene.success()
    assert not cubes_stacked((0.5, 0.1, 0.125), (0.5, 0.1, 0.075))  # B is lifted off the table
    assert not cubes_stacked((0.53, 0.1, 0.075), (0.5, 0.1, 0.025))  # 3 cm off-centre


def test_refuses_to_overwrite_and_reuses_the_cache(dataset_root):
    mtime = (dataset_root / "states.pth").stat().st_mtime_ns
    with pytest.raises(sim.DatasetExistsError, match="complete dataset"):
        sim.generate_dataset(dataset_root, EPISODES, FRAMES, SEED, shadows=False)
    assert sim.ensure_demo_dataset(dataset_root, episodes=EPISODES, frames=FRAMES, seed=SEED) == dataset_root
    assert (dataset_root / "states.pth").stat().st_mtime_ns == mtime


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sim.generate_dataset(tmp_path / "out", 2, 4, shadows=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet(dataset_root, tmp_path):
    from PIL import Image

    sim.main(["--preview", str(dataset_root), "--png", str(tmp_path / "sheet.png")])
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (8 * 256 + 7 * 4, EPISODES * 256 + (EPISODES - 1) * 4)


def test_missing_robot_model_names_the_pip_commands(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(sim_scene.SimSetupError, match="pip install --no-deps gymnasium-robotics==1.4.2"):
        sim_scene.franka_asset_dir()
