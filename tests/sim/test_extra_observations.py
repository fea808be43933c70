"""Depth and semantic-mask observations (``extra_observations``, docs/environment.md).

The renderer returns them in the same call as the camera image: the image (and the whole
trajectory) is byte-identical with or without them, they are bit-identical across reruns and
copies, depth is metric z-depth, and the semantic classes match what is drawn."""

from __future__ import annotations

import copy
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from helpers import SHORT_SPEC, TINY
from steerloop.sim import ENV_ID, conditions
from steerloop.sim.camera import FAR_PLANE, NEAR_PLANE, body_camera_matrices
from steerloop.sim.env import LaneKeepEnv
from steerloop.sim.scene import (GROUND, MARKING, ROAD, ROLE_CLASSES, SCENERY, SEMANTIC_CLASSES, SKY, VEHICLE,
                                 scenery_roles)

BOTH = ("depth", "semantic")


def make(**config) -> gym.Env:
    return gym.make(ENV_ID, **{"track": copy.deepcopy(SHORT_SPEC), "resolution": TINY, **config})


def weave(t: int) -> np.ndarray:
    return np.array([0.15 * np.sin(2 * np.pi * t / 40)], np.float32)


@pytest.mark.parametrize("channels_first", [False, True])
def test_spaces_pass_gymnasium_check_env_in_both_layouts(channels_first):
    env = make(extra_observations=BOTH, channels_first=channels_first)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped)
        obs, _ = env.reset(seed=0)
    finally:
        env.close()
    assert [str(w.message) for w in caught] == []
    plane = (1, *TINY) if channels_first else (*TINY, 1)
    assert obs["depth"].shape == obs["semantic"].shape == plane
    assert obs["depth"].dtype == np.float32 and obs["semantic"].dtype == np.uint8
    space = env.observation_space
    assert (space["depth"].low.min(), space["depth"].high.max()) == (np.float32(NEAR_PLANE), np.float32(FAR_PLANE))
    assert space["semantic"].high.max() == len(SEMANTIC_CLASSES) - 1


def test_sb3_check_env_passes_and_warns_only_about_the_non_image_planes():
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make(resolution=(36, 64), extra_observations=BOTH)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sb3_check_env(env, warn=True)
    finally:
        env.close()
    assert caught and all("depth" in str(w.message) or "semantic" in str(w.message) for w in caught)


@pytest.mark.parametrize("condition", ["default", "town-rain", "forest-fog"])
def test_images_and_trajectories_are_byte_identical_with_and_without(condition):
    runs = []
    for extras in ((), BOTH):
        env = LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, condition=condition, cameras=("center", "left"),
                          extra_observations=extras)
        try:
            obs, info = env.reset(seed=4)
            steps = [(obs["image"].tobytes(), info["frames"]["left"].tobytes(), info["x"], info["y"])]
            for t in range(25):
                obs, _, _, _, info = env.step(weave(t))
                steps.append((obs["image"].tobytes(), info["frames"]["left"].tobytes(), info["x"], info["y"]))
        finally:
            env.close()
        runs.append(steps)
    assert runs[0] == runs[1]


def test_bit_identical_across_reruns_and_copies():
    def drive(env, steps, start=0):
        out = []
        for t in range(start, start + steps):
            obs, *_ = env.step(weave(t))
            out.append((obs["depth"].tobytes(), obs["semantic"].tobytes()))
        return out

    first, second = (LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, condition="town-rain", extra_observations=BOTH)
                     for _ in range(2))
    try:
        first.reset(seed=7)
        second.reset(seed=7)
        assert drive(first, 10) == drive(second, 10)
        twin = copy.deepcopy(first)  # rebuilds the world: body ids and the class table come back
        try:
            assert drive(first, 10, 10) == drive(twin, 10, 10)
        finally:
            twin.close()
    finally:
        first.close()
        second.close()


def test_depth_is_metric_distance_along_the_optical_axis():
    env = LaneKeepEnv(track=SHORT_SPEC, resolution=(66, 200), extra_observations=("depth",))
    try:
        obs, _ = env.reset(seed=0)  # on the initial straight: flat road ahead
        spec = env.episode_cameras[0]
        view, _ = body_camera_matrices(env.client, spec, *env.vehicle.base_state(), env.vehicle_params.wheel_radius)
    finally:
        env.close()
    camera_to_world = np.linalg.inv(np.asarray(view).reshape(4, 4).T)
    eye, tan_half = camera_to_world[:3, 3], math.tan(math.radians(spec.fov_deg / 2))
    height = spec.height
    for row in (65, 60, 50, 40):
        # The tiny renderer samples row r at the pixel boundary below it; the road (z = 0) is a plane there.
        ray = camera_to_world[:3, :3] @ np.array([0.0, (1 - 2 * (row + 1) / height) * tan_half, -1.0])
        expected = -eye[2] / ray[2]  # the ray has unit length along the optical axis: this is z-depth [m]
        assert obs["depth"][row, 100, 0] == pytest.approx(expected, rel=2e-3)
    assert obs["depth"][0].min() > 500.0  # the horizon and the sky box are far away


def test_semantic_classes_are_what_is_drawn():
    env = LaneKeepEnv(track=SHORT_SPEC, resolution=(66, 200), condition="town-rain", extra_observations=BOTH)
    try:
        obs, _ = env.reset(seed=0)
        counts = {}
        for t in range(60):
            obs, *_ = env.step(weave(t))
            for value in np.unique(obs["semantic"]):
                counts[int(value)] = counts.get(int(value), 0) + 1
        plain = LaneKeepEnv(track=SHORT_SPEC, resolution=(66, 200), extra_observations=BOTH)
        try:
            flat, _ = plain.reset(seed=0)
        finally:
            plain.close()
    finally:
        env.close()
    assert set(counts) == set(range(len(SEMANTIC_CLASSES)))  # buildings, parked cars, kerbs... all seen
    semantic, image, depth = flat["semantic"][..., 0], flat["image"].astype(float), flat["depth"][..., 0]
    assert semantic[65, 100] == ROAD and semantic[0, 100] == SKY
    assert image[semantic == MARKING].mean() > image[semantic == ROAD].mean() + 60  # white paint on grey asphalt
    assert image[semantic == GROUND][:, 1].mean() > image[semantic == GROUND][:, 0].mean()  # green meadow
    assert depth[semantic == SKY].min() > depth[semantic == ROAD].max()
    everything = conditions.Scenery(patches=1.0, verge_width=1.0, kerb=True, trees=1.0, bushes=1.0, poles=1.0,
                                    posts=1.0, fences=1.0, buildings=1.0, parked_cars=1.0, grade=0.05)  # + terrain
    assert set(scenery_roles(everything)) | {"asphalt", "edge_line", "centre_line"} == set(ROLE_CLASSES)
    assert ROLE_CLASSES["car"] == VEHICLE and ROLE_CLASSES["building"] == SCENERY


@pytest.mark.parametrize("bad, match", [
    ({"extra_observations": ("depht",)}, r"extra_observations: unknown observation 'depht' \(did you mean 'depth'\?\); "
                                         r"valid names are \['depth', 'semantic'\]"),
    ({"extra_observations": ("depth", "depth")}, "names an observation twice"),
    ({"extra_observations": ("depth",), "observation": "image"}, "needs observation='dict'"),
])
def test_bad_extra_observations_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, **bad)
