"""Tests for sim.env.LaneKeepEnv: API conformance, determinism, spaces, actions, info,
termination, rewards, configuration errors and rendering."""

from __future__ import annotations

import math
import numbers
import warnings

import gymnasium as gym
import numpy as np
import pytest
from helpers import SHORT_SPEC, TINY, drive_with_expert_label, straight_spec

from steerloop.sim import ENV_ID, controllers
from steerloop.sim.env import REWARD_WEIGHTS, RENDER_SIZE, LaneKeepEnv
from steerloop.sim.scene import CONDITIONS

INFO_KEYS = ("lateral_offset", "heading_error", "rear_heading_error", "progress", "curvature", "speed",
             "wheel_angle", "departure", "expert_steering")
REWARD_TERMS = {"progress", "offset", "heading", "steering_rate", "departure", "off_road"}


# ---------------------------------------------------------------- API checkers
def test_gymnasium_check_env_passes_without_warnings():
    # gymnasium 1.x check_env warns when handed a wrapped env and recommends `env.unwrapped`;
    # the unwrapped env keeps the spec from gym.make, so the render-mode and close checks still run.
    env = gym.make(ENV_ID, track=SHORT_SPEC, resolution=TINY)
    try:
        from gymnasium.utils.env_checker import check_env

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped)
    finally:
        env.close()


SB3_IMAGE_SIZE_WARNING = "minimal resolution for an image is 36x36"


def _sb3_check(resolution):
    from stable_baselines3.common.env_checker import check_env

    env = gym.make(ENV_ID, track=SHORT_SPEC, resolution=resolution)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env, warn=True)
    finally:
        env.close()
    return [str(w.message) for w in caught]


def test_sb3_check_env_no_warnings_at_cnn_sized_images():
    assert _sb3_check((36, 64)) == []


def test_sb3_check_env_tiny_images_only_warn_about_cnn_minimum_size():
    # SB3's default CnnPolicy needs >= 36x36 images; the only acceptable warning at 16x32 is that one.
    messages = _sb3_check(TINY)
    unexpected = [m for m in messages if SB3_IMAGE_SIZE_WARNING not in m]
    assert unexpected == []
    assert any(SB3_IMAGE_SIZE_WARNING in m for m in messages)


# ---------------------------------------------------------------- determinism
def _assert_info_equal(a: dict, b: dict, step: int):
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        if key == "frames":
            assert value.keys() == other.keys()
            for name in value:
                assert np.array_equal(value[name], other[name]), f"frame {name} differs at step {step}"
        elif key == "reward_terms":
            assert value == other, f"reward terms differ at step {step}"
        elif isinstance(value, (numbers.Number, np.ndarray)):
            assert np.array_equal(value, other), f"info[{key!r}] differs at step {step}: {value!r} != {other!r}"
        else:
            assert value == other, f"info[{key!r}] differs at step {step}"


def test_same_seed_and_actions_are_bit_identical(make_env):
    # A 300 m straight so 200 steps of weaving never end the episode.
    envs = [make_env(track=straight_spec(300.0), cameras=("center", "left")) for _ in range(2)]
    results = [env.reset(seed=123) for env in envs]
    (obs_a, info_a), (obs_b, info_b) = results
    assert np.array_equal(obs_a["image"], obs_b["image"]) and np.array_equal(obs_a["speed"], obs_b["speed"])
    _assert_info_equal(info_a, info_b, 0)
    ended = False
    for t in range(200):
        action = np.array([0.15 * math.cos(2 * math.pi * t / 40)], np.float32)  # weave, 2 s period
        out_a, out_b = envs[0].step(action), envs[1].step(action)
        obs_a, reward_a, term_a, trunc_a, info_a = out_a
        obs_b, reward_b, term_b, trunc_b, info_b = out_b
        assert np.array_equal(obs_a["image"], obs_b["image"]), f"image differs at step {t}"
        assert np.array_equal(obs_a["speed"], obs_b["speed"]), f"speed differs at step {t}"
        assert reward_a == reward_b and term_a == term_b and trunc_a == trunc_b
        _assert_info_equal(info_a, info_b, t + 1)
        ended = term_a or trunc_a
        if ended:
            break
    assert not ended, "the weave should stay on the 300 m straight for 200 steps"
    assert abs(info_a["lateral_offset"]) > 0.05, "the weave should actually move the car"


@pytest.mark.parametrize("track", [SHORT_SPEC, None], ids=["spec", "procedural"])
def test_reset_with_same_seed_twice_gives_identical_first_observation(make_env, track):
    env = make_env(track=track, track_length=150.0, condition=("default", "dusk", "worn", "desert"))
    obs1, info1 = env.reset(seed=7)
    obs2, info2 = env.reset(seed=7)
    assert np.array_equal(obs1["image"], obs2["image"])
    assert np.array_equal(obs1["speed"], obs2["speed"])
    assert info1["track"] == info2["track"] and info1["condition"] == info2["condition"]
    _assert_info_equal(info1, info2, 0)


# ---------------------------------------------------------------- spaces
def test_observation_and_action_spaces(make_env):
    env = make_env()
    obs_space = env.observation_space
    assert isinstance(obs_space, gym.spaces.Dict)
    assert set(obs_space.spaces) == {"image", "speed"}
    assert obs_space["image"].shape == (*TINY, 3) and obs_space["image"].dtype == np.uint8
    assert obs_space["image"].low.min() == 0 and obs_space["image"].high.max() == 255
    assert obs_space["speed"].shape == (1,) and obs_space["speed"].dtype == np.float32
    assert env.action_space.shape == (1,) and env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, _ = env.reset(seed=0)
    assert obs_space.contains(obs)
    assert obs["image"].shape == (*TINY, 3) and obs["image"].dtype == np.uint8
    assert obs["speed"][0] == pytest.approx(10.0, abs=0.05)


def test_longitudinal_adds_throttle_action(make_env):
    env = make_env(longitudinal=True)
    assert env.action_space.shape == (2,)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0.0, 0.5], np.float32))
    assert info["throttle"] == pytest.approx(0.5)


def test_privileged_observation(make_env):
    env = make_env(privileged=True)
    assert env.observation_space["privileged"].shape == (controllers.FEATURE_SIZE,)
    assert env.observation_space["privileged"].dtype == np.float32
    obs, info = env.reset(seed=0, options={"start_offset": 0.3})
    assert obs["privileged"].shape == (controllers.FEATURE_SIZE,) and obs["privileged"].dtype == np.float32
    assert env.observation_space.contains(obs)
    features = controllers.LaneFeatures.from_array(obs["privileged"])
    assert features.offset == pytest.approx(info["lateral_offset"], abs=1e-5)
    assert "privileged" not in make_env().observation_space.spaces


def test_three_cameras_first_is_the_observation_others_in_info_frames(make_env):
    env = make_env(cameras=("center", "left", "right"))
    obs, info = env.reset(seed=0)
    frames = info["frames"]
    assert set(frames) == {"left", "right"}  # the centre frame is the observation's image, not repeated
    for frame in frames.values():
        assert frame.shape == (*TINY, 3) and frame.dtype == np.uint8
    assert not np.array_equal(frames["left"], obs["image"])
    assert not np.array_equal(frames["right"], obs["image"])
    assert not np.array_equal(frames["left"], frames["right"])
    assert not any(np.shares_memory(obs["image"], frame) for frame in frames.values())
    obs, _, _, _, info = env.step(np.zeros(1, np.float32))
    assert set(info["frames"]) == {"left", "right"}


def test_one_camera_hands_out_its_frame_once(make_env):
    # Every array crosses a SubprocVecEnv pipe: the centre frame must travel once, in the observation.
    env = make_env()
    obs, info = env.reset(seed=0)
    assert "frames" not in info
    _, _, _, _, info = env.step(np.zeros(1, np.float32))
    assert "frames" not in info
    assert not [key for key, value in info.items() if isinstance(value, np.ndarray) and value.ndim == 3]


# ---------------------------------------------------------------- actions
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_action_raises(make_env, bad):
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([bad], np.float32))


def test_out_of_range_action_is_clipped(make_env):
    env = make_env()
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([0.5], np.float32))
    assert info["action_clipped"] is False
    _, _, _, _, info = env.step(np.array([3.0], np.float32))
    assert info["action_clipped"] is True
    assert info["steering"] == 1.0
    _, _, _, _, info = env.step(np.array([-7.0], np.float32))
    assert info["action_clipped"] is True
    assert info["steering"] == -1.0


@pytest.mark.parametrize("shape", [(2,), (0,), (3, 1)])
def test_wrong_action_shape_raises(make_env, shape):
    env = make_env()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(shape, np.float32))


# ---------------------------------------------------------------- info and sign conventions
def test_info_keys_present_at_reset_and_step(make_env):
    env = make_env()
    _, info = env.reset(seed=0)
    for key in INFO_KEYS:
        assert key in info, key
    _, _, _, _, info = env.step(np.zeros(1, np.float32))
    for key in INFO_KEYS:
        assert key in info, key
    for key in ("lateral_offset", "heading_error", "rear_heading_error", "progress", "curvature", "speed",
                "wheel_angle", "expert_steering"):
        assert isinstance(info[key], numbers.Real) and math.isfinite(info[key]), key
    assert isinstance(info["departure"], (bool, np.bool_))
    assert info["progress"] > 0
    assert info["speed"] == pytest.approx(10.0, abs=0.2)


@pytest.mark.parametrize("offset", [0.5, -0.5])
def test_offset_sign_convention_and_expert_steers_back(make_env, offset):
    env = make_env()
    _, info = env.reset(seed=0, options={"start_offset": offset})
    assert info["lateral_offset"] == pytest.approx(offset, abs=1e-3)
    # + = left of centre, so the expert steers right (negative) to come back, and vice versa.
    assert np.sign(info["expert_steering"]) == -np.sign(offset)


def test_positive_steering_turns_left(make_env):
    env = make_env(track=straight_spec(100.0))
    env.reset(seed=0)
    for _ in range(10):
        _, _, _, _, info = env.step(np.array([0.2], np.float32))
    assert info["lateral_offset"] > 0.02
    assert info["heading_error"] > 0.01
    assert info["wheel_angle"] > 0


def test_start_heading_and_start_s_options(make_env):
    env = make_env()
    _, info = env.reset(seed=0, options={"start_heading": 0.1, "start_s": 20.0})
    assert info["heading_error"] == pytest.approx(0.1, abs=1e-3)
    assert info["progress"] == pytest.approx(20.0, abs=1e-3)
    with pytest.raises(ValueError, match="start_offst"):
        env.reset(seed=0, options={"start_offst": 0.5})


# ---------------------------------------------------------------- termination
def test_full_left_steering_ends_off_road(make_env):
    env = make_env()
    env.reset(seed=0)
    for step in range(200):
        _, reward, terminated, truncated, info = env.step(np.array([1.0], np.float32))
        if terminated or truncated:
            break
    assert terminated and not truncated
    assert info["off_road"] is True and info["success"] is False
    assert abs(info["lateral_offset"]) > env.unwrapped.config.offroad_threshold
    assert info["departures"] >= 1
    assert info["reward_terms"]["off_road"] == -REWARD_WEIGHTS["off_road"]


def test_expert_completes_short_track(make_env):
    env = make_env()
    info, infos = drive_with_expert_label(env)
    assert info["success"] is True and info["off_road"] is False
    assert info["progress"] >= info["route_length"]
    assert info["departures"] == 0
    assert len(infos) < 300
    assert max(abs(i["lateral_offset"]) for i in infos) < 0.3


# ---------------------------------------------------------------- reward
def test_reward_is_sum_of_named_terms(make_env):
    env = make_env()
    _, info = env.reset(seed=0, options={"start_offset": 0.4})
    assert info["reward_terms"] == {}
    for t in range(20):
        _, reward, _, _, info = env.step(np.array([0.3 * math.sin(t)], np.float32))
        terms = info["reward_terms"]
        assert set(terms) == REWARD_TERMS
        assert reward == pytest.approx(sum(terms.values()), abs=1e-12)
        assert terms["progress"] > 0
        assert terms["offset"] == pytest.approx(-REWARD_WEIGHTS["offset"] * info["lateral_offset"] ** 2)
        assert terms["heading"] == pytest.approx(-REWARD_WEIGHTS["heading"] * info["heading_error"] ** 2)


# ---------------------------------------------------------------- configuration errors
def test_unknown_option_raises_type_error_naming_it():
    with pytest.raises(TypeError, match="bogus_option"):
        gym.make(ENV_ID, track=SHORT_SPEC, resolution=TINY, bogus_option=3)
    with pytest.raises(TypeError, match="bogus_option"):
        LaneKeepEnv(bogus_option=3)


def test_unknown_condition_lists_valid_ones():
    with pytest.raises(ValueError, match="fog") as error:
        LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, condition="fog")
    for name in CONDITIONS:
        assert name in str(error.value)


def test_control_hz_must_divide_physics_hz():
    with pytest.raises(ValueError, match="control_hz"):
        LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, physics_hz=240, control_hz=7)
    env = LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, physics_hz=240, control_hz=10)
    try:
        assert env.substeps == 24 and env.dt == pytest.approx(0.1)
    finally:
        env.close()


# ---------------------------------------------------------------- rendering
def test_render_rgb_array_and_top_down(make_env):
    env = make_env(render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.zeros(1, np.float32))
    frame = env.render()
    assert frame.shape == (*RENDER_SIZE, 3) == (240, 320, 3) and frame.dtype == np.uint8
    assert frame.std() > 0
    top = env.unwrapped.top_down()
    assert top.shape == (320, 320, 3) and top.dtype == np.uint8
    plain = make_env()
    plain.reset(seed=0)
    assert plain.render() is None  # no render_mode -> nothing


def test_conditions_render_differently(make_env):
    env = make_env()
    means = {}
    for name in ("default", "dusk", "worn", "desert"):  # today's four colour conditions
        obs, info = env.reset(seed=0, options={"condition": name})
        assert info["condition"] == name
        means[name] = obs["image"].reshape(-1, 3).mean(axis=0)
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 3.0, f"{a} and {b} look the same: {means[a]} vs {means[b]}"


def test_privileged_features_match_straight_road_geometry(make_env):
    env = make_env(track=straight_spec(100.0), privileged=True)
    offset, heading = 0.4, 0.05
    obs, _ = env.reset(seed=0, options={"start_offset": offset, "start_heading": heading, "start_s": 20.0})
    f = controllers.LaneFeatures.from_array(obs["privileged"])
    half = env.unwrapped.vehicle_params.wheelbase / 2
    assert f.offset == pytest.approx(offset, abs=1e-5)
    assert f.heading_error == pytest.approx(heading, abs=1e-5)
    assert f.front_offset == pytest.approx(offset + half * math.sin(heading), abs=1e-5)
    assert f.front_curvature == 0.0 and f.wheel_angle == 0.0
    assert f.speed == pytest.approx(10.0, abs=1e-3)
    # centre-line points ahead of the rear axle, in the rear-axle frame (x forward, y left)
    c, s = math.cos(heading), math.sin(heading)
    d = controllers.LOOKAHEAD_DISTANCES
    dy = -(offset - half * s)
    np.testing.assert_allclose(f.lookahead, np.c_[c * d + s * dy, -s * d + c * dy], atol=1e-4)


@pytest.mark.parametrize("sign", [1, -1])
def test_rear_heading_error_is_zero_in_steady_turning(make_env, sign):
    """A kinematic car whose front axle follows a 25 m arc: every point turns about the arc's
    centre O, the rear axle on radius sqrt(R^2 - L^2) with its velocity (the heading) tangent
    to it. Hand geometry: midpoint offset R - sqrt(R^2 - 3 L^2 / 4) = 0.1096 m towards O and
    heading error -atan((L/2) / sqrt(R^2 - L^2)) = -3.109 deg at the midpoint, 0 at the rear axle."""
    radius = 25.0
    spec = {"name": "arc", "lane_width": 3.7, "segments": [
        {"type": "straight", "length": 30}, {"type": "arc", "radius": radius, "angle": sign * 120},
        {"type": "straight", "length": 30}]}
    env = make_env(track=spec, privileged=True)
    wheelbase = env.unwrapped.vehicle_params.wheelbase
    rear_radius = math.sqrt(radius ** 2 - wheelbase ** 2)
    offset = sign * (radius - math.hypot(rear_radius, wheelbase / 2))
    heading = -sign * math.atan(wheelbase / 2 / rear_radius)
    assert (abs(offset), math.degrees(abs(heading))) == pytest.approx((0.1096, 3.109), abs=1e-3)
    obs, info = env.reset(seed=0, options={"start_s": 30 + radius * math.radians(60), "start_offset": offset,
                                           "start_heading": heading})
    assert info["curvature"] == pytest.approx(sign / radius)
    assert info["lateral_offset"] == pytest.approx(offset, abs=1e-6)
    assert info["heading_error"] == pytest.approx(heading, abs=1e-6)
    assert info["rear_heading_error"] == pytest.approx(0.0, abs=1e-6)
    assert controllers.LaneFeatures.from_array(obs["privileged"]).front_offset == pytest.approx(0.0, abs=1e-5)
