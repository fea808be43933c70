"""Recovery augmentation: side cameras and synthetic viewpoint shifts with corrective labels,
plus photometric jitter.

A frame seen from a viewpoint displaced ``shift`` metres to the left and yawed ``yaw``
radians to the left of where the car really was is labelled with the command that would
bring the car back to the centre line in about ``RECOVERY_TIME`` seconds (PilotNet's
rule): pure pursuit towards the point of the original path ``speed * RECOVERY_TIME``
metres ahead, added to the logged expert label.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from steerloop.sim.camera import SIDE_CAMERA_OFFSET, CameraSpec

RECOVERY_TIME = 2.0  # [s] the corrective label returns the car to the centre line in about this time
MIN_RECOVERY_DISTANCE = 8.0  # [m] lower bound of the corrective lookahead distance
SHIFT_RANGE = 0.6  # [m] synthetic lateral shifts are drawn from U(-SHIFT_RANGE, SHIFT_RANGE)
YAW_RANGE = math.radians(4.0)  # [rad] synthetic yaw rotations are drawn from U(-YAW_RANGE, YAW_RANGE)
BRIGHTNESS_RANGE = 0.25  # [-] multiplicative brightness jitter
CONTRAST_RANGE = 0.2  # [-] contrast jitter around the mean
CAMERA_SHIFTS = {"center": 0.0, "left": SIDE_CAMERA_OFFSET, "right": -SIDE_CAMERA_OFFSET}  # [m], + = left


def corrective_label(label, speed, shift, yaw, wheelbase: float = 2.7, max_wheel_angle: float = 0.5):
    """Expert label corrected for a viewpoint ``shift`` [m] (+ left) and ``yaw`` [rad] (+ left).

    Vectorised over numpy arrays. Seen from the displaced viewpoint, the original path's
    point ``d = max(speed * RECOVERY_TIME, MIN_RECOVERY_DISTANCE)`` ahead lies at bearing
    ``alpha = atan2(-shift, d) - yaw``; the pure-pursuit curvature towards it is
    ``2 sin(alpha) / d``, turned into a normalised command and added to the label.
    """
    d = np.maximum(np.asarray(speed, dtype=np.float64) * RECOVERY_TIME, MIN_RECOVERY_DISTANCE)
    alpha = np.arctan2(-np.asarray(shift, dtype=np.float64), d) - np.asarray(yaw, dtype=np.float64)
    delta = np.arctan(wheelbase * 2.0 * np.sin(alpha) / d)
    return np.clip(np.asarray(label, dtype=np.float64) + delta / max_wheel_angle, -1.0, 1.0).astype(np.float32)


def _intrinsics(spec: CameraSpec) -> np.ndarray:
    focal = (spec.height / 2) / math.tan(math.radians(spec.fov_deg) / 2)
    return np.array([[focal, 0, spec.width / 2], [0, focal, spec.height / 2], [0, 0, 1.0]])


def viewpoint_homography(spec: CameraSpec, shift: float, yaw: float) -> np.ndarray:
    """3x3 homography mapping the real camera's pixels to those of a camera moved ``shift``
    metres left and yawed ``yaw`` radians left, exact for points on the flat ground."""
    K = _intrinsics(spec)
    pitch = math.radians(spec.pitch_deg)
    # Camera frame: x right, y down, z forward. Car frame: x forward, y left, z up.
    car_from_cam = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=np.float64)
    c, s = math.cos(pitch), math.sin(pitch)
    pitch_rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])  # pitches the optical axis down by `pitch`
    R_car_cam = pitch_rot @ car_from_cam  # real camera -> car frame
    cy, sy = math.cos(yaw), math.sin(yaw)
    yaw_rot = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    R_car_new = yaw_rot @ R_car_cam  # new camera -> car frame
    t_car = np.array([0.0, shift, 0.0])  # new camera position relative to the real one
    normal_car, height = np.array([0.0, 0.0, 1.0]), spec.mount_height  # ground plane z = -height below the camera
    # Plane-induced homography from real to new camera: H = K R (I + t n^T / d) K^-1 in camera coordinates.
    R = R_car_new.T @ R_car_cam
    t = R_car_new.T @ (-t_car)
    n = R_car_cam.T @ (-normal_car)  # plane normal in the real camera frame, pointing down to the plane
    H = K @ (R + np.outer(t, n) / height) @ np.linalg.inv(K)
    return H / H[2, 2]


def warp_viewpoint(image: np.ndarray, spec: CameraSpec, shift: float, yaw: float) -> np.ndarray:
    """The frame as seen from the shifted/yawed viewpoint (ground-plane homography)."""
    H = viewpoint_homography(spec, shift, yaw)
    return cv2.warpPerspective(image, H, (image.shape[1], image.shape[0]), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)


def photometric_jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness and contrast jitter (contrast about mid-grey), one draw for the whole
    window (..., H, W, 3) uint8, applied through a 256-entry lookup table."""
    brightness = 1.0 + rng.uniform(-BRIGHTNESS_RANGE, BRIGHTNESS_RANGE)
    contrast = 1.0 + rng.uniform(-CONTRAST_RANGE, CONTRAST_RANGE)
    levels = np.arange(256, dtype=np.float32)
    table = np.clip(((levels - 128.0) * contrast + 128.0) * brightness, 0, 255).astype(np.uint8)
    return table[images]
