"""Recovery augmentation (training.augment): corrective labels and viewpoint warps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steerloop.sim.camera import SIDE_CAMERA_OFFSET, CameraSpec
from steerloop.sim.env import LaneKeepEnv
from steerloop.training.augment import (CAMERA_SHIFTS, MIN_RECOVERY_DISTANCE, RECOVERY_TIME, corrective_label,
                              photometric_jitter, viewpoint_homography, warp_viewpoint)

from helpers import straight_spec


# ----------------------------------------------------------------------------- corrective labels
@pytest.mark.parametrize("label", [-0.4, 0.0, 0.25])
@pytest.mark.parametrize("speed", [0.0, 5.0, 10.0])
def test_zero_shift_and_yaw_return_the_label(label, speed):
    out = corrective_label(label, speed, 0.0, 0.0)
    assert out.dtype == np.float32
    assert float(out) == pytest.approx(label, abs=1e-7)


def test_left_shift_steers_right():
    base = float(corrective_label(0.1, 10.0, 0.0, 0.0))
    left = float(corrective_label(0.1, 10.0, 0.5, 0.0))
    right = float(corrective_label(0.1, 10.0, -0.5, 0.0))
    assert left < base < right
    assert base - left == pytest.approx(right - base)  # symmetric


def test_left_yaw_steers_right():
    base = float(corrective_label(0.0, 10.0, 0.0, 0.0))
    assert float(corrective_label(0.0, 10.0, 0.0, math.radians(3))) < base
    assert float(corrective_label(0.0, 10.0, 0.0, -math.radians(3))) > base


def test_correction_grows_with_shift():
    shifts = np.array([0.1, 0.3, 0.7])
    out = corrective_label(np.zeros(3), np.full(3, 10.0), shifts, np.zeros(3))
    assert out.shape == (3,)
    assert np.all(np.diff(out) < 0)


def test_hand_computed_value():
    # d = max(10 m/s x 2 s, 8 m) = 20 m; alpha = atan2(-0.7, 20) - 0.05;
    # delta = atan(2.7 x 2 sin(alpha) / 20); label + delta / 0.5
    label, speed, shift, yaw = 0.1, 10.0, 0.7, 0.05
    d = max(speed * RECOVERY_TIME, MIN_RECOVERY_DISTANCE)
    assert d == 20.0
    alpha = math.atan2(-shift, d) - yaw
    delta = math.atan(2.7 * 2.0 * math.sin(alpha) / d)
    expected = label + delta / 0.5
    # by hand: alpha = -0.034986 - 0.05 = -0.084986, 0.27 sin(alpha) = -0.022918, atan -> -0.022914,
    # / 0.5 = -0.045829, + 0.1 label = 0.054171
    assert expected == pytest.approx(0.054171, abs=1e-5)
    assert float(corrective_label(label, speed, shift, yaw)) == pytest.approx(expected, abs=1e-6)


def test_low_speed_uses_the_minimum_recovery_distance():
    # at 1 m/s, d = max(2 m, 8 m) = 8 m
    alpha = math.atan2(-0.5, MIN_RECOVERY_DISTANCE)
    expected = math.atan(2.7 * 2.0 * math.sin(alpha) / MIN_RECOVERY_DISTANCE) / 0.5
    assert float(corrective_label(0.0, 1.0, 0.5, 0.0)) == pytest.approx(expected, abs=1e-6)


def test_labels_are_clipped_to_the_command_range():
    assert float(corrective_label(0.95, 10.0, -2.0, -0.3)) == 1.0
    assert float(corrective_label(-0.95, 10.0, 2.0, 0.3)) == -1.0


def test_side_camera_shifts():
    assert CAMERA_SHIFTS == {"center": 0.0, "left": SIDE_CAMERA_OFFSET, "right": -SIDE_CAMERA_OFFSET}


# ----------------------------------------------------------------------------- homography
@pytest.mark.parametrize("resolution", [(33, 100), (66, 200)])
def test_zero_shift_and_yaw_homography_is_identity(resolution):
    spec = CameraSpec(height=resolution[0], width=resolution[1])
    np.testing.assert_allclose(viewpoint_homography(spec, 0.0, 0.0), np.eye(3), atol=1e-12)


def test_zero_warp_leaves_the_image_unchanged():
    image = np.random.default_rng(0).integers(0, 256, (33, 100, 3), dtype=np.uint8)
    np.testing.assert_array_equal(warp_viewpoint(image, CameraSpec(height=33, width=100), 0.0, 0.0), image)


def test_yaw_only_homography_is_a_pure_rotation():
    # a yaw without translation is a rotation homography: it does not depend on the ground plane,
    # so a point on the horizon row stays on the horizon row
    spec = CameraSpec(height=33, width=100)
    H = viewpoint_homography(spec, 0.0, math.radians(3))
    focal = (spec.height / 2) / math.tan(math.radians(spec.fov_deg) / 2)
    horizon = spec.height / 2 - focal * math.tan(math.radians(spec.pitch_deg))
    p = H @ np.array([spec.width / 2, horizon, 1.0])
    assert p[1] / p[2] == pytest.approx(horizon, abs=1e-6)
    assert p[0] / p[2] > spec.width / 2  # yawing left moves the scene to the right of the image


@pytest.fixture(scope="module")
def centre_and_left_frames():
    """Centre and left camera frames at 33x100 after some expert steps on a straight road."""
    env = LaneKeepEnv(cameras=("center", "left"), resolution=(33, 100), track=straight_spec(150.0))
    try:
        obs, info = env.reset(seed=0)
        for _ in range(30):
            obs, _, _, _, info = env.step(np.array([info["expert_steering"]], np.float32))
        return obs["image"].copy(), info["frames"]["left"].copy(), env.camera_specs[0]
    finally:
        env.close()


def test_warped_centre_frame_matches_the_left_camera(centre_and_left_frames):
    centre, left, spec = centre_and_left_frames
    assert spec.name == "center" and centre.shape == (33, 100, 3)
    focal = (spec.height / 2) / math.tan(math.radians(spec.fov_deg) / 2)
    horizon = spec.height / 2 - focal * math.tan(math.radians(spec.pitch_deg))
    rows = slice(int(math.ceil(horizon)) + 1, None)  # the ground, below the horizon

    def error(image):
        return float(np.abs(image[rows].astype(np.float64) - left[rows].astype(np.float64)).mean())

    unwarped = error(centre)
    warped = error(warp_viewpoint(centre, spec, SIDE_CAMERA_OFFSET, 0.0))
    wrong_way = error(warp_viewpoint(centre, spec, -SIDE_CAMERA_OFFSET, 0.0))
    assert warped < 0.6 * unwarped, (warped, unwarped)
    assert wrong_way > warped


# ----------------------------------------------------------------------------- photometric jitter
def test_photometric_jitter_is_seeded_and_keeps_shape_and_dtype():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 32, 3), dtype=np.uint8)
    a = photometric_jitter(images, np.random.default_rng(5))
    b = photometric_jitter(images, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, images)
