"""Car-mounted cameras: fixed to the body, so they pitch and roll with it.

Frames are uint8 RGB arrays of shape (H, W, 3) rendered by PyBullet's CPU
``ER_TINY_RENDERER`` (headless, deterministic). The default matches NVIDIA PilotNet's
66x200 input. Side cameras (``left``, ``right``) sit ``SIDE_CAMERA_OFFSET`` metres to
either side of the centre camera, as in PilotNet's recording rig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pybullet as p

SIDE_CAMERA_OFFSET = 0.7  # [m] lateral offset of the left/right cameras from the centre camera
NEAR_PLANE = 0.3  # [m]
FAR_PLANE = 9000.0  # [m] beyond the sky box (sim.scene.WORLD_HALF_SIZE) in every direction
CAMERA_NAMES = ("center", "left", "right")
MIN_SIZE = 8  # [px] smallest image height or width
FOV_RANGE_DEG = (5.0, 150.0)  # [deg] accepted vertical field of view
PITCH_RANGE_DEG = (-45.0, 80.0)  # [deg] accepted downward pitch


@dataclass(frozen=True)
class CameraSpec:
    """Intrinsics and mounting of one camera, relative to the car's base frame."""

    name: str = "center"
    """One of CAMERA_NAMES; decides the lateral mount position."""
    height: int = 66
    """Image height [px]."""
    width: int = 200
    """Image width [px]."""
    fov_deg: float = 45.0
    """Vertical field of view [deg]."""
    pitch_deg: float = 8.0
    """Downward pitch of the optical axis [deg]."""
    mount_height: float = 1.4
    """Height of the camera above the ground [m] (the car's base sits at wheel-axle height)."""
    mount_forward: float = 0.6
    """Position ahead of the wheelbase midpoint [m]."""
    yaw_deg: float = 0.0
    """Leftward yaw of the optical axis [deg] (a mounting error; 0 looks straight ahead)."""

    def __post_init__(self):
        if self.name not in CAMERA_NAMES:
            raise ValueError(f"camera name must be one of {CAMERA_NAMES}, got {self.name!r}")
        if not (self.height >= MIN_SIZE and self.width >= MIN_SIZE):
            raise ValueError(f"camera resolution must be at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {self.height}x{self.width}")
        low, high = FOV_RANGE_DEG
        if not low <= self.fov_deg <= high:
            raise ValueError(f"fov_deg must be within [{low:g}, {high:g}] degrees, got {self.fov_deg}")
        low, high = PITCH_RANGE_DEG
        if not low <= self.pitch_deg <= high:
            raise ValueError(f"camera pitch (camera_pitch_deg) must be within [{low:g}, {high:g}] degrees, "
                             f"got {self.pitch_deg}")

    @property
    def lateral(self) -> float:
        return {"center": 0.0, "left": SIDE_CAMERA_OFFSET, "right": -SIDE_CAMERA_OFFSET}[self.name]


@dataclass(frozen=True)
class Lighting:
    """Arguments of the tiny renderer's single directional light."""

    direction: tuple[float, float, float] = (0.4, 0.3, 1.0)
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ambient: float = 0.6
    diffuse: float = 0.5
    specular: float = 0.0


def render(client, width: int, height: int, view: list, projection: list, lighting: Lighting,
           depth: bool = False, segmentation: bool = False):
    """One frame from the tiny renderer as a (H, W, 3) uint8 RGB array; with ``depth``, also
    the (H, W) float32 depth buffer in [0, 1] (see :func:`sim.imaging.linear_depth`); with
    ``segmentation``, also the (H, W) int32 mask of the body id seen at each pixel (-1: none),
    which the same call computes (the RGB is the same with or without it)."""
    _, _, rgba, depth_buffer, mask = client.getCameraImage(
        width, height, view, projection, renderer=p.ER_TINY_RENDERER,
        flags=0 if segmentation else p.ER_NO_SEGMENTATION_MASK, shadow=0,
        lightDirection=list(lighting.direction), lightColor=list(lighting.color),
        lightAmbientCoeff=lighting.ambient, lightDiffuseCoeff=lighting.diffuse,
        lightSpecularCoeff=lighting.specular)
    rgb = np.ascontiguousarray(np.reshape(rgba, (height, width, 4))[:, :, :3])
    if not depth and not segmentation:
        return rgb
    out = [rgb]
    if depth:
        out.append(np.reshape(np.asarray(depth_buffer, np.float32), (height, width)))
    if segmentation:
        out.append(np.reshape(np.asarray(mask, np.int32), (height, width)))
    return tuple(out)


def body_camera_matrices(client, spec: CameraSpec, base_position, base_orientation,
                         axle_height: float) -> tuple[list, list]:
    """View and projection matrices of a camera rigidly mounted on the car body.

    ``axle_height`` [m] is the height of the base frame above the ground at rest.
    """
    rotation = np.asarray(client.getMatrixFromQuaternion(base_orientation)).reshape(3, 3)
    mount = np.array([spec.mount_forward, spec.lateral, spec.mount_height - axle_height])
    pitch, yaw = math.radians(spec.pitch_deg), math.radians(spec.yaw_deg)
    cos_yaw, sin_yaw = math.cos(yaw), math.sin(yaw)  # exactly 1 and 0 at yaw 0: the same matrices as without yaw
    forward = rotation @ np.array([math.cos(pitch) * cos_yaw, math.cos(pitch) * sin_yaw, -math.sin(pitch)])
    up = rotation @ np.array([math.sin(pitch) * cos_yaw, math.sin(pitch) * sin_yaw, math.cos(pitch)])
    eye = np.asarray(base_position) + rotation @ mount
    view = client.computeViewMatrix(eye.tolist(), (eye + forward).tolist(), up.tolist())
    projection = client.computeProjectionMatrixFOV(spec.fov_deg, spec.width / spec.height, NEAR_PLANE, FAR_PLANE)
    return view, projection


def chase_camera_matrices(client, base_position, yaw: float, width: int, height: int, ground: float = 0.0,
                          ahead: float = 0.0) -> tuple[list, list]:
    """A third-person view from behind and above the car (for ``render_mode="rgb_array"``);
    ``ground`` [m]: the height of the road under the car, ``ahead`` [m]: how much higher the road
    is where the camera looks (6 m ahead; graded roads)."""
    back, up_height = 9.0, 4.0  # [m]
    x, y, _ = base_position
    eye = [x - back * math.cos(yaw), y - back * math.sin(yaw), up_height + ground]
    target = [x + 6.0 * math.cos(yaw), y + 6.0 * math.sin(yaw), 0.5 + ground + ahead]
    view = client.computeViewMatrix(eye, target, [0, 0, 1])
    projection = client.computeProjectionMatrixFOV(50.0, width / height, NEAR_PLANE, FAR_PLANE)
    return view, projection
