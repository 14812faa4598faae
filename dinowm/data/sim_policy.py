"""Scripted pick-and-place policy for the Franka cube-stacking scene (see sim_scene.py).

The policy plans Cartesian waypoints for the `end_effector` site once, from the initial cube poses:

    home -> above A -> down to grasp -> close -> lift -> above B -> down to place -> open -> retreat

with the gripper pointing down and its yaw equal to the cube's yaw modulo 90 degrees (the fingers
close on two opposite faces; at place time the yaw is turned so that A lands aligned with B).
Every motion segment gets a random speed, then all durations are rescaled so the plan fills ~90% of
the episode (the rest is a hold). Positions and yaw follow min-jerk profiles between waypoints.

Each frame, damped-least-squares IK (a few iterations, with a null-space pull towards the home
posture) moves a separate copy of the joint state that holds the *commanded* joints, so the action
is a smooth joint-position target rather than a jump to a solved pose. The finger command ramps at
0.08 m/s: the fingers are slow (damping 100, armature 5), hence the dwell segments.

Heights: the site is 5 cm above the fingertips, so a grasp at site z = cube centre + 3 cm puts the
fingertips 5 mm above the table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinowm.data.sim_scene import (
    ARM_JOINTS,
    CUBE_HALF,
    CUBE_MIN_DISTANCE,
    CUBE_X_RANGE,
    CUBE_Y_RANGE,
    FINGER_OPEN,
    FrankaCubeScene,
)

# Sim-convention joints of the Franka "ready" posture: gripper down, yaw 0, ~0.49 m above the table.
READY_QPOS_SIM = np.array([0.0, -0.785, 0.0, -2.356, 0.0, 0.0, 0.0])
# Orientation of the site with the gripper pointing down at yaw 0 (columns = site axes in world).
GRIPPER_DOWN = np.diag([1.0, -1.0, -1.0])

GRASP_ABOVE_CENTRE = 0.03  # m, site height above the cube centre when grasping
APPROACH_CLEARANCE = 0.10  # m, pre-grasp / retreat height above the grasp height
CARRY_HEIGHT = 0.20  # m, site height while carrying (cube A clears cube B by ~6 cm)
PLACE_MARGIN = 0.004  # m, release A this far above resting contact
FINGER_SPEED = 0.08  # m/s, finger command ramp
PLAN_FILL = 0.9  # fraction of the episode used by the plan

# (name, nominal seconds, finger target). Dwells hold the pose while the fingers close or open.
SEGMENTS = [
    ("above_a", 1.6, FINGER_OPEN),
    ("grasp", 1.0, FINGER_OPEN),
    ("close", 0.7, 0.0),
    ("lift", 0.9, 0.0),
    ("above_b", 1.6, 0.0),
    ("place", 1.0, 0.0),
    ("open", 0.5, FINGER_OPEN),
    ("retreat", 0.8, FINGER_OPEN),
]
DWELLS = {"close", "open"}
MIN_DWELL_SECONDS = {"close": 0.6, "open": 0.4}  # the fingers need this long to close / release


def sample_cube_poses(rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    """Cube A and B as {name: (x, y, yaw)}, uniform on the table region, at least 13 cm apart."""
    while True:
        xy = rng.uniform([CUBE_X_RANGE[0], CUBE_Y_RANGE[0]], [CUBE_X_RANGE[1], CUBE_Y_RANGE[1]], size=(2, 2))
        if np.linalg.norm(xy[0] - xy[1]) >= CUBE_MIN_DISTANCE:
            break
    yaws = rng.uniform(-np.pi, np.pi, size=2)
    return {"cube_a": (*xy[0], yaws[0]), "cube_b": (*xy[1], yaws[1])}


def wrap_quarter_turn(angle: float) -> float:
    """The angle modulo 90 degrees, in [-45, 45) degrees (a cube looks the same every quarter turn)."""
    return float((angle + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def gripper_down_rotation(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ GRIPPER_DOWN


def min_jerk(progress: float) -> float:
    """0 -> 1 with zero velocity and acceleration at both ends."""
    p = min(max(progress, 0.0), 1.0)
    return p**3 * (10 - 15 * p + 6 * p * p)


class JointTargetIK:
    """Damped-least-squares IK for the site pose, on its own MjData holding the commanded joints."""

    def __init__(self, scene: FrankaCubeScene, damping: float = 0.05, null_gain: float = 0.05):
        self.scene = scene
        self.mujoco = scene.mujoco
        self.data = scene.mujoco.MjData(scene.model)
        self.damping = damping
        self.null_gain = null_gain
        arm_joint_ids = [scene.model.joint(name).id for name in ARM_JOINTS]
        self.jnt_low, self.jnt_high = scene.model.jnt_range[arm_joint_ids].T  # (7,), (7,)
        self.jac_pos = np.zeros((3, scene.model.nv))
        self.jac_rot = np.zeros((3, scene.model.nv))

    def solve(self, q: np.ndarray, target_pos, target_rot, rest_q: np.ndarray, iterations: int) -> np.ndarray:
        """Move joints q (7,) towards the site pose (target_pos (3,), target_rot (3, 3)); returns new q."""
        scene, mujoco = self.scene, self.mujoco
        q = q.copy()
        for _ in range(iterations):
            self.data.qpos[scene.arm_qpos_ids] = q
            mujoco.mj_kinematics(scene.model, self.data)
            mujoco.mj_comPos(scene.model, self.data)
            site_rot = self.data.site_xmat[scene.site_id].reshape(3, 3)
            pos_error = np.asarray(target_pos) - self.data.site_xpos[scene.site_id]
            # Small-angle rotation taking the current axes onto the target axes (world frame).
            rot_error = 0.5 * np.cross(site_rot.T, np.asarray(target_rot).T).sum(axis=0)
            mujoco.mj_jacSite(scene.model, self.data, self.jac_pos, self.jac_rot, scene.site_id)
            jac = np.vstack([self.jac_pos, self.jac_rot])[:, scene.arm_dof_ids]  # (6, 7)
            jac_pinv = jac.T @ np.linalg.inv(jac @ jac.T + self.damping**2 * np.eye(6))  # (7, 6)
            null_space = np.eye(7) - jac_pinv @ jac
            q = q + jac_pinv @ np.concatenate([pos_error, rot_error]) + null_space @ (self.null_gain * (rest_q - q))
            q = np.clip(q, self.jnt_low, self.jnt_high)
        return q


@dataclass
class Waypoint:
    name: str
    frames: int
    position: np.ndarray  # (3,) site target at the end of the segment
    yaw: float
    finger: float  # per-finger target held during the segment


class ScriptedStacker:
    """Plans the stacking motion for the scene's current state; `action(t)` gives the 9 actuator
    targets (sim convention) for frame t of an episode of `episode_frames` frames."""

    def __init__(self, scene: FrankaCubeScene, rng: np.random.Generator, episode_frames: int, home_qpos: np.ndarray):
        self.scene = scene
        self.ik = JointTargetIK(scene)
        self.home_qpos = home_qpos
        self.q_cmd = scene.data.qpos[scene.arm_qpos_ids].copy()
        self.finger_cmd = FINGER_OPEN
        self.finger_step = FINGER_SPEED * scene.frame_dt
        self.waypoints = self._plan(rng, episode_frames)
        self.segment_ends = np.cumsum([w.frames for w in self.waypoints])
        self.start_pos = scene.data.site_xpos[scene.site_id].copy()
        site_rot = scene.data.site_xmat[scene.site_id]  # (9,) row-major; yaw of the site's x axis
        self.start_yaw = float(np.arctan2(site_rot[3], site_rot[0]))

    def _plan(self, rng: np.random.Generator, episode_frames: int) -> list[Waypoint]:
        scene = self.scene
        a, b = scene.cube_position("cube_a"), scene.cube_position("cube_b")
        grasp_yaw = wrap_quarter_turn(scene.cube_yaw("cube_a"))
        # Turn A during the carry so that it lands aligned with B.
        place_yaw = grasp_yaw + wrap_quarter_turn(scene.cube_yaw("cube_b") - scene.cube_yaw("cube_a"))
        grasp_z = a[2] + GRASP_ABOVE_CENTRE
        place_z = b[2] + 2 * CUBE_HALF + GRASP_ABOVE_CENTRE + PLACE_MARGIN
        targets = {
            "above_a": ((a[0], a[1], grasp_z + APPROACH_CLEARANCE), grasp_yaw),
            "grasp": ((a[0], a[1], grasp_z), grasp_yaw),
            "close": ((a[0], a[1], grasp_z), grasp_yaw),
            "lift": ((a[0], a[1], CARRY_HEIGHT), grasp_yaw),
            "above_b": ((b[0], b[1], CARRY_HEIGHT), place_yaw),
            "place": ((b[0], b[1], place_z), place_yaw),
            "open": ((b[0], b[1], place_z), place_yaw),
            "retreat": ((b[0], b[1], place_z + APPROACH_CLEARANCE), place_yaw),
        }
        speed = [1.0 if name in DWELLS else rng.uniform(0.8, 1.25) for name, _, _ in SEGMENTS]
        seconds = np.array([nominal for _, nominal, _ in SEGMENTS]) * speed
        seconds *= PLAN_FILL * episode_frames * scene.frame_dt / seconds.sum()
        dwell = np.array([name in DWELLS for name, _, _ in SEGMENTS])
        min_dwell = np.array([MIN_DWELL_SECONDS.get(name, 0.0) for name, _, _ in SEGMENTS])
        # Short episodes: keep the dwells long enough for the fingers and squeeze the motions instead.
        seconds[dwell] = np.maximum(seconds[dwell], min_dwell[dwell])
        motion_budget = max(PLAN_FILL * episode_frames * scene.frame_dt - seconds[dwell].sum(), 0.0)
        seconds[~dwell] *= motion_budget / seconds[~dwell].sum()
        frames = np.maximum(np.round(seconds / scene.frame_dt).astype(int), 1)
        return [
            Waypoint(name, int(n), np.array(targets[name][0]), targets[name][1], finger)
            for (name, _, finger), n in zip(SEGMENTS, frames)
        ]

    def _target(self, t: int) -> tuple[np.ndarray, float, float]:
        """Site position, yaw and finger target at frame t (min-jerk inside the current segment)."""
        index = int(np.searchsorted(self.segment_ends, t, side="right"))
        if index >= len(self.waypoints):
            last = self.waypoints[-1]
            return last.position, last.yaw, last.finger
        waypoint = self.waypoints[index]
        previous_pos = self.waypoints[index - 1].position if index else self.start_pos
        previous_yaw = self.waypoints[index - 1].yaw if index else self.start_yaw
        segment_start = self.segment_ends[index] - waypoint.frames
        s = min_jerk((t + 1 - segment_start) / waypoint.frames)
        return (
            previous_pos + s * (waypoint.position - previous_pos),
            previous_yaw + s * (waypoint.yaw - previous_yaw),
            waypoint.finger,
        )

    def action(self, t: int, ik_iterations: int = 3) -> np.ndarray:
        """(9,) actuator targets, sim convention: 7 joint targets | 2 finger targets in [0, 0.04]."""
        position, yaw, finger = self._target(t)
        self.q_cmd = self.ik.solve(self.q_cmd, position, gripper_down_rotation(yaw), self.home_qpos, ik_iterations)
        self.finger_cmd += float(np.clip(finger - self.finger_cmd, -self.finger_step, self.finger_step))
        return np.concatenate([self.q_cmd, [self.finger_cmd, self.finger_cmd]])


def sample_home_qpos(scene: FrankaCubeScene, rng: np.random.Generator) -> np.ndarray:
    """A jittered home posture (sim convention): gripper down, ~0.32 m above the table."""
    position = np.array([0.45, 0.0, 0.32]) + rng.uniform([-0.04, -0.06, -0.03], [0.04, 0.06, 0.03])
    yaw = rng.uniform(-0.2, 0.2)
    target_rot = gripper_down_rotation(yaw)
    return JointTargetIK(scene).solve(READY_QPOS_SIM, position, target_rot, READY_QPOS_SIM, iterations=60)
