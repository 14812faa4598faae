"""The simulated Franka cube-stacking scene: MuJoCo model, reset, state, rendering, success check.

Scene (all lengths in metres, z up):
  - a table whose top is the plane z = 0, the Franka Panda base at the origin;
  - the Panda of the `gymnasium-robotics` wheel (`envs/assets/kitchen_franka/franka_assets`, Apache-2.0):
    7 arm joints and 2 finger joints, 9 position actuators = 7 joint targets + 2 finger targets in
    [0, 0.04]. Every robot body gets `gravcomp="1"` because a real Franka compensates gravity and the
    position actuators sag without it;
  - cube A (red, the one to pick up) and cube B (green, the base), 5 cm, 0.1 kg, free joints;
  - two lights (one may cast shadows) and a fixed camera at (0.85, -1.2, 1.0) looking at
    (0.35, 0, 0.25), fovy 45, which keeps the whole arm and both cubes in view.

Joint convention: the kitchen model re-zeroes joints 6 and 7. The real robot reads
    q_real = q_sim + REAL_JOINT_OFFSET = q_sim + [0, 0, 0, 0, 0, pi/2, pi/4].
The dataset is written in the real-robot convention by default.

The environment is prepared in `import_mujoco()`: MUJOCO_GL must be set before `import mujoco`, and the
gymnasium_robotics package is only located (never imported: its own dependencies are not installed).
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path

import numpy as np

from dinowm.errors import UserError

PIP_SIM_HINT = 'pip install -e ".[sim]" && pip install --no-deps gymnasium-robotics==1.4.2'
APT_EGL_HINT = "apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri"
APT_OSMESA_HINT = "apt-get install -y libosmesa6"

TIMESTEP = 0.002  # s, physics step
CUBE_HALF = 0.025  # m, cubes are 5 cm
IMAGE_SIZE = 256
REAL_JOINT_OFFSET = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.pi / 2, np.pi / 4])
CAMERA = {"name": "front", "pos": (0.85, -1.2, 1.0), "lookat": (0.35, 0.0, 0.25), "fovy": 45.0}

# Cube spawn region on the table and minimum centre distance (m).
CUBE_X_RANGE = (0.38, 0.62)
CUBE_Y_RANGE = (-0.22, 0.22)
CUBE_MIN_DISTANCE = 0.13

ARM_JOINTS = [f"robot:panda0_joint{i}" for i in range(1, 8)]
FINGER_JOINTS = ["robot:panda0_finger_joint1", "robot:panda0_finger_joint2"]
FINGER_OPEN = 0.04  # m, per finger; 0 is closed


class SimSetupError(UserError, RuntimeError):
    """A missing package or system library; the message says what to install."""


def _loadable(*names: str) -> bool:
    try:
        for name in names:
            ctypes.CDLL(name)
    except OSError:
        return False
    return True


def choose_gl_backend() -> str:
    """Set MUJOCO_GL unless the user did: EGL (Mesa) if its libraries load, else OSMesa, else 'egl'
    (rendering will then fail with the apt-get line). Must run before mujoco is imported."""
    if "MUJOCO_GL" not in os.environ:
        if _loadable("libEGL.so.1", "libEGL_mesa.so.0"):
            os.environ["MUJOCO_GL"] = "egl"
        elif _loadable("libOSMesa.so.8") or _loadable("libOSMesa.so.6"):
            os.environ["MUJOCO_GL"] = "osmesa"
        else:
            os.environ["MUJOCO_GL"] = "egl"
    return os.environ["MUJOCO_GL"]


def import_mujoco():
    """Import mujoco after choosing the GL backend; a missing package names the pip commands."""
    if "mujoco" not in sys.modules:
        choose_gl_backend()
    try:
        return importlib.import_module("mujoco")
    except ImportError as err:
        raise SimSetupError(f"mujoco is not installed ({err}); run: {PIP_SIM_HINT}") from None


def franka_asset_dir() -> Path:
    """The Franka model folder inside the gymnasium-robotics wheel, found without importing it."""
    spec = importlib.util.find_spec("gymnasium_robotics")
    if spec is None or not spec.submodule_search_locations:
        raise SimSetupError(f"gymnasium-robotics (which ships the Franka model) is not installed; run: {PIP_SIM_HINT}")
    folder = Path(spec.submodule_search_locations[0]) / "envs/assets/kitchen_franka/franka_assets"
    if not (folder / "chain.xml").is_file():
        reinstall = "pip install --no-deps --force-reinstall gymnasium-robotics==1.4.2"
        raise SimSetupError(f"no Franka model at {folder}; run: {reinstall}")
    return folder


def _include_body(path: Path) -> str:
    """The content of a <mujocoinclude> file without its wrapper and comments."""
    text = re.sub(r"<!--.*?-->", "", path.read_text(), flags=re.S)
    return re.sub(r"</?mujocoinclude>", "", text).strip()


def _camera_xyaxes(pos, lookat) -> str:
    forward = np.subtract(lookat, pos)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return " ".join(f"{v:.6f}" for v in (*right, *up))


def build_scene_xml(shadows: bool) -> str:
    """The MJCF of the whole scene as one string (meshdir made absolute)."""
    assets = franka_asset_dir()
    robot_assets = _include_body(assets / "assets.xml").replace(
        'meshdir="franka_assets/meshes"', f'meshdir="{assets / "meshes"}"'
    )
    robot_assets = re.sub(r"<option[^>]*/>", "", robot_assets)  # our own <option> below
    robot_chain = _include_body(assets / "chain.xml").replace("<body ", '<body gravcomp="1" ')
    actuators = _include_body(assets / "actuator.xml")
    cube = CUBE_HALF
    cam = CAMERA
    cam_pos = " ".join(map(str, cam["pos"]))
    cam_axes = _camera_xyaxes(cam["pos"], cam["lookat"])
    return f"""
<mujoco model="franka_cube_stack">
  {robot_assets}
  <option timestep="{TIMESTEP}" cone="elliptic" impratio="10"/>
  <visual>
    <global offwidth="{IMAGE_SIZE}" offheight="{IMAGE_SIZE}"/>
    <quality shadowsize="1024" offsamples="0"/>
  </visual>
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1="0.55 0.65 0.75" rgb2="0.15 0.18 0.22" width="64" height="64"/>
    <texture name="wood" type="2d" builtin="checker" rgb1="0.62 0.52 0.40" rgb2="0.58 0.48 0.37" width="256" height="256"/>
    <material name="table" texture="wood" texrepeat="6 6"/>
    <material name="cube_a" rgba="0.85 0.12 0.10 1"/>
    <material name="cube_b" rgba="0.15 0.65 0.20 1"/>
  </asset>
  <worldbody>
    <light name="key" pos="0.6 -0.6 2.2" dir="-0.2 0.3 -1" diffuse="0.7 0.7 0.7" castshadow="{str(shadows).lower()}"/>
    <light name="fill" pos="-0.8 0.8 2.0" dir="0.4 -0.4 -1" diffuse="0.35 0.35 0.35" castshadow="false"/>
    <camera name="{cam['name']}" pos="{cam_pos}" xyaxes="{cam_axes}" fovy="{cam['fovy']}"/>
    <geom name="table" type="box" pos="0.35 0 -0.03" size="0.9 0.9 0.03" material="table" friction="1 0.005 0.0001"/>
    {robot_chain}
    <body name="cube_a" pos="0.5 -0.1 {cube}">
      <freejoint name="cube_a"/>
      <geom type="box" size="{cube} {cube} {cube}" mass="0.1" material="cube_a" friction="1.2 0.005 0.0001" condim="4"/>
    </body>
    <body name="cube_b" pos="0.5 0.1 {cube}">
      <freejoint name="cube_b"/>
      <geom type="box" size="{cube} {cube} {cube}" mass="0.1" material="cube_b" friction="1.2 0.005 0.0001" condim="4"/>
    </body>
  </worldbody>
  {actuators}
</mujoco>
"""


def cubes_stacked(top_pos, bottom_pos) -> bool:
    """Success: the top cube rests on the bottom cube (centres 5 cm apart vertically within 1 cm,
    horizontally within 2.5 cm) and the bottom cube is still on the table."""
    top, bottom = np.asarray(top_pos), np.asarray(bottom_pos)
    return bool(
        abs(top[2] - (bottom[2] + 2 * CUBE_HALF)) < 0.01
        and np.linalg.norm(top[:2] - bottom[:2]) < 0.025
        and abs(bottom[2] - CUBE_HALF) < 0.01
    )


class FrankaCubeScene:
    """One MuJoCo model + data of the scene, with an optional 256x256 offscreen renderer."""

    def __init__(self, shadows: bool = False, physics_steps_per_frame: int = 25, render: bool = True):
        self.mujoco = mujoco = import_mujoco()
        self.model = mujoco.MjModel.from_xml_string(build_scene_xml(shadows))
        self.data = mujoco.MjData(self.model)
        self.physics_steps_per_frame = physics_steps_per_frame
        self.frame_dt = physics_steps_per_frame * TIMESTEP
        model = self.model
        self.arm_qpos_ids = np.array([model.joint(name).qposadr[0] for name in ARM_JOINTS])
        self.arm_dof_ids = np.array([model.joint(name).dofadr[0] for name in ARM_JOINTS])
        self.finger_qpos_ids = np.array([model.joint(name).qposadr[0] for name in FINGER_JOINTS])
        self.cube_qpos_ids = {name: model.joint(name).qposadr[0] for name in ("cube_a", "cube_b")}
        self.cube_dof_ids = {name: model.joint(name).dofadr[0] for name in ("cube_a", "cube_b")}
        self.site_id = self.model.site("end_effector").id
        self.camera_id = self.model.camera(CAMERA["name"]).id
        self.renderer = self._make_renderer() if render else None

    def _make_renderer(self):
        try:
            return self.mujoco.Renderer(self.model, IMAGE_SIZE, IMAGE_SIZE)
        except Exception as err:  # mujoco raises several types when the GL libraries are missing
            backend = os.environ.get("MUJOCO_GL", "")
            hint = APT_OSMESA_HINT if backend == "osmesa" else f"{APT_EGL_HINT} (or: {APT_OSMESA_HINT}, MUJOCO_GL=osmesa)"
            raise SimSetupError(
                f"cannot render with MUJOCO_GL={backend} ({type(err).__name__}: {err}); install Mesa: {hint}"
            ) from None

    def close(self) -> None:
        # OSMesa prints a traceback at interpreter exit unless the context is freed explicitly.
        if self.renderer is not None:
            self.renderer.close()
            self.renderer = None

    # --- reset ---------------------------------------------------------------------------------

    def reset(self, arm_qpos_sim: np.ndarray, cube_poses: dict[str, tuple[float, float, float]]) -> None:
        """Arm at `arm_qpos_sim` (sim convention), fingers open, cubes at {name: (x, y, yaw)} on the table."""
        mujoco = self.mujoco
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[self.arm_qpos_ids] = arm_qpos_sim
        self.data.qpos[self.finger_qpos_ids] = FINGER_OPEN
        for name, (x, y, yaw) in cube_poses.items():
            self.set_cube(name, (x, y, CUBE_HALF), yaw)
        self.data.ctrl[:7] = arm_qpos_sim
        self.data.ctrl[7:] = FINGER_OPEN
        mujoco.mj_forward(self.model, self.data)

    def set_cube(self, name: str, position, yaw: float) -> None:
        adr = self.cube_qpos_ids[name]
        self.data.qpos[adr : adr + 3] = position
        self.data.qpos[adr + 3 : adr + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))  # wxyz about z
        self.data.qvel[self.cube_dof_ids[name] : self.cube_dof_ids[name] + 6] = 0.0

    # --- observation ---------------------------------------------------------------------------

    def cube_position(self, name: str) -> np.ndarray:
        adr = self.cube_qpos_ids[name]
        return self.data.qpos[adr : adr + 3].copy()

    def cube_yaw(self, name: str) -> float:
        adr = self.cube_qpos_ids[name]
        w, x, y, z = self.data.qpos[adr + 3 : adr + 7]
        return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))

    def state(self, real_joint_convention: bool = True) -> np.ndarray:
        """(22,) float32: ee_pos(3) | ee_quat wxyz(4) | gripper width(1) | joint_pos(7) | joint_vel(7)."""
        quat = np.empty(4)
        self.mujoco.mju_mat2Quat(quat, self.data.site_xmat[self.site_id])
        joints = self.data.qpos[self.arm_qpos_ids] + (REAL_JOINT_OFFSET if real_joint_convention else 0.0)
        width = self.data.qpos[self.finger_qpos_ids].sum()
        return np.concatenate(
            [self.data.site_xpos[self.site_id], quat, [width], joints, self.data.qvel[self.arm_dof_ids]]
        ).astype(np.float32)

    def render(self) -> np.ndarray:
        """(256, 256, 3) uint8 RGB from the fixed camera."""
        self.renderer.update_scene(self.data, camera=self.camera_id)
        return self.renderer.render()

    # --- dynamics ------------------------------------------------------------------------------

    def step(self, ctrl_sim: np.ndarray, frames: int = 1) -> None:
        """Apply the 9 actuator targets (sim convention) for `frames` control periods."""
        self.data.ctrl[:] = ctrl_sim
        self.mujoco.mj_step(self.model, self.data, nstep=self.physics_steps_per_frame * frames)
        # mj_step computes poses before integrating: refresh them so state() and render() match qpos.
        self.mujoco.mj_kinematics(self.model, self.data)

    def success(self) -> bool:
        return cubes_stacked(self.cube_position("cube_a"), self.cube_position("cube_b"))
