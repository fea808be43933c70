"""LaneKeep at the edges where Gymnasium and SB3 users meet it (docs/environment.md).

Gymnasium's own env tests (tests/envs/test_envs.py: env checker without warnings,
determinism rollout, render modes, pickling) written for LaneKeep, SB3's checker, copies
that are independent and bit-identical, close/reset, render_fps, the image-only and
channels-first observation modes with Box-only wrappers and the documented SAC example,
and the checks that must survive ``python -O``.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from helpers import SHORT_SPEC, TINY, straight_spec
from gymnasium.utils.env_checker import check_env, data_equivalence

from steerloop.sim import ENV_ID
from steerloop.sim.env import LaneKeepEnv
from steerloop.sim.wrappers import InterventionWrapper, Perturbation, PerturbationWrapper

SEED = 0
NUM_STEPS = 50  # gymnasium's test_env_determinism_rollout length
CNN_SIZE = (36, 64)  # (H, W) [px]: SB3's NatureCNN needs >= 36x36
MODES = {"dict": {}, "image": {"observation": "image"},
         "image-chw": {"observation": "image", "channels_first": True}, "dict-chw": {"channels_first": True}}
COPIERS = {"deepcopy": copy.deepcopy, "pickle": lambda env: pickle.loads(pickle.dumps(env))}
DOC = Path(__file__).resolve().parents[2] / "docs" / "environment.md"


def make(**config) -> gym.Env:
    """A gym.make'd LaneKeep on the short spec at tiny resolution (override anything)."""
    return gym.make(ENV_ID, **{"track": copy.deepcopy(SHORT_SPEC), "resolution": TINY, **config})


def weave(t: int) -> np.ndarray:
    """A deterministic steering pattern that moves the car about (2 s period at 20 Hz)."""
    return np.array([0.15 * np.sin(2 * np.pi * t / 40)], np.float32)


def assert_same(a, b, where: str = ""):
    assert data_equivalence(a, b, exact=True), f"outputs differ {where}"


# ---------------------------------------------------------------- Gymnasium's and SB3's checkers
@pytest.mark.parametrize("mode", MODES)
def test_gymnasium_check_env_no_warnings(mode):
    # As gymnasium's test_envs_pass_env_checker: the unwrapped env keeps gym.make's spec, so the
    # determinism, data-reuse, render-mode and close checks all run.
    env = make(**MODES[mode])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped)
    finally:
        env.close()
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("mode", MODES)
def test_sb3_check_env_with_render_check_closes_then_resets(mode):
    # skip_render_check=False renders, closes the env, then resets it again (its NaN check).
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = make(resolution=CNN_SIZE, render_mode="rgb_array", **MODES[mode])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sb3_check_env(env, warn=True, skip_render_check=False)
        assert [str(w.message) for w in caught] == []
        obs, _ = env.reset(seed=SEED)
        assert env.observation_space.contains(obs)
    finally:
        env.close()


# ---------------------------------------------------------------- determinism (test_env_determinism_rollout)
def test_env_determinism_rollout():
    env_1, env_2 = make(cameras=("center", "left")), make(cameras=("center", "left"))
    try:
        assert_same(env_1.reset(seed=SEED), env_2.reset(seed=SEED), "after reset")
        env_1.action_space.seed(SEED)
        for t in range(NUM_STEPS):
            action = env_1.action_space.sample()
            out_1, out_2 = env_1.step(action), env_2.step(action)
            assert_same(out_1, out_2, f"at step {t}")
            assert env_1.observation_space.contains(out_1[0])
            if out_1[2] or out_1[3]:
                env_1.reset(seed=SEED)
                env_2.reset(seed=SEED)
    finally:
        env_1.close()
        env_2.close()


# ---------------------------------------------------------------- render modes (test_render_modes)
def check_rendered(frame):
    assert isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    assert frame.std() > 0  # a picture, not a blank


def test_render_modes():
    env = make()
    assert "rgb_array" in env.metadata["render_modes"]
    for mode in env.metadata["render_modes"]:
        new_env = make(render_mode=mode)
        try:
            new_env.reset()
            check_rendered(new_env.render())
            new_env.step(new_env.action_space.sample())
            check_rendered(new_env.render())
        finally:
            new_env.close()
    env.close()


def test_render_fps_is_control_hz_per_instance():
    slow, default = make(control_hz=10, render_mode="rgb_array"), make()
    try:
        assert slow.metadata["render_fps"] == slow.unwrapped.metadata["render_fps"] == 10
        assert default.metadata["render_fps"] == 20
        assert LaneKeepEnv.metadata["render_fps"] == 20  # the class default is not overwritten
        # One rendered frame per control step: 10 frames at 10 fps last the second they simulate.
        slow.reset(seed=SEED)
        for _ in range(10):
            _, _, _, _, info = slow.step(np.zeros(1, np.float32))
        assert info["time"] == pytest.approx(10 / slow.metadata["render_fps"])
    finally:
        slow.close()
        default.close()


# ---------------------------------------------------------------- pickling and copies (test_pickle_env)
@pytest.mark.parametrize("copier", COPIERS)
def test_pickle_env(copier):
    # gymnasium's pattern, asserted: a copy resets and steps exactly like the original.
    env = make()
    try:
        env.reset(seed=SEED)
        copied = COPIERS[copier](env)
        assert_same(env.reset(seed=SEED), copied.reset(seed=SEED), "after a seeded reset")
        action = env.action_space.sample()
        assert_same(env.step(action), copied.step(action), "after a step")
        # An unseeded reset draws from the copied np_random: the same next episode.
        assert_same(env.reset(), copied.reset(), "after an unseeded reset")
        copied.close()
    finally:
        env.close()


@pytest.mark.parametrize("copier", COPIERS)
def test_copy_mid_episode_continues_bit_identically_with_wrapper_state(copier):
    """Copied after 20 steps, mid-weave: the physics (velocities, contacts), steering delay
    line, cruise integral, TimeLimit counter and a perturbation scheduled after the copy
    all carry over; every later output is bit-identical, up to the same truncation."""

    def build():
        env = gym.make(ENV_ID, track=straight_spec(300.0), resolution=TINY, cameras=("center", "left"),
                       max_episode_steps=60)
        return InterventionWrapper(PerturbationWrapper(env, [Perturbation.push(25), Perturbation.kick(52)]))

    env = build()
    try:
        env.reset(seed=SEED)
        for t in range(20):
            env.step(weave(t))
        copied = COPIERS[copier](env)
        overridden = []
        for t in range(20, 60):
            out, out_copy = env.step(weave(t)), copied.step(weave(t))
            assert_same(out, out_copy, f"at step {t + 1}")
            overridden.append(out[4]["policy_overridden"])
        assert out[3] and out_copy[3], "both truncate at the copied TimeLimit's step 60"
        assert out[4]["time"] == pytest.approx(3.0)
        assert sum(overridden) == 25 + 1, "the push (25 steps) and the kick (1 step) acted after the copy"
        copied.close()
    finally:
        env.close()


@pytest.mark.parametrize("copier", COPIERS)
def test_copy_is_independent_of_the_original(copier):
    """A never-copied reference with the same history predicts the original: resetting,
    stepping, closing and collecting the copy changes nothing the original sees."""
    reference, env = make(render_mode="rgb_array"), make(render_mode="rgb_array")
    try:
        for e in (reference, env):
            e.reset(seed=SEED)
            for t in range(10):
                e.step(weave(t))
        copied = COPIERS[copier](env)
        copied.reset(seed=SEED + 1, options={"track": straight_spec(100.0), "condition": "dusk"})
        copied.step(np.ones(1, np.float32))
        assert not np.array_equal(copied.render(), env.render())
        assert_same(env.step(weave(10)), reference.step(weave(10)), "after the copy was reset")
        np.testing.assert_array_equal(env.render(), reference.render())  # the chase camera too
        copied.close()
        del copied
        gc.collect()
        for t in range(11, 20):  # the original's client survived the copy's close and collection
            assert_same(env.step(weave(t)), reference.step(weave(t)), f"after the copy was collected, step {t}")
    finally:
        reference.close()
        env.close()


def test_original_closed_leaves_the_copy_running():
    env = make()
    env.reset(seed=SEED)
    copied = copy.deepcopy(env)
    env.close()
    del env
    gc.collect()
    _, _, _, _, info = copied.step(weave(0))
    assert info["progress"] > 0
    copied.close()


def test_copies_of_fresh_and_closed_envs():
    fresh = make()
    try:
        copied = copy.deepcopy(fresh)
        with pytest.raises(RuntimeError, match=r"before reset\(\)"):
            copied.unwrapped.step(np.zeros(1, np.float32))
        assert_same(copied.reset(seed=SEED), fresh.reset(seed=SEED))
        copied.close()
        fresh.close()
        closed = pickle.loads(pickle.dumps(fresh))
        assert closed.unwrapped.client is None  # a closed env's copy is closed ...
        assert_same(closed.reset(seed=SEED), fresh.reset(seed=SEED))  # ... and reopens on reset, like its original
        closed.close()
    finally:
        fresh.close()


# ---------------------------------------------------------------- close and reset
def test_reset_after_close_reopens_as_a_fresh_env():
    env, fresh = LaneKeepEnv(track=SHORT_SPEC, resolution=TINY), LaneKeepEnv(track=SHORT_SPEC, resolution=TINY)
    try:
        env.reset(seed=3)
        env.step(weave(0))
        env.close()
        env.close()  # twice is fine
        with pytest.raises(RuntimeError, match=r"after close\(\); call reset\(\)"):
            env.step(weave(0))
        assert_same(env.reset(seed=SEED), fresh.reset(seed=SEED), "after reopening")
        for t in range(5):
            assert_same(env.step(weave(t)), fresh.step(weave(t)), f"after reopening, step {t}")
    finally:
        env.close()
        fresh.close()


def test_step_and_render_before_reset_raise_clear_errors():
    env = LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, render_mode="rgb_array")
    try:
        for call in (lambda: env.step(weave(0)), env.render, env.top_down, lambda: env.place_car(0.0)):
            with pytest.raises(RuntimeError, match=r"before reset\(\); call env.reset\(seed=...\) first"):
                call()
    finally:
        env.close()


# ---------------------------------------------------------------- observation modes
def test_image_modes_show_the_dict_modes_frame():
    images = {}
    for name, config in MODES.items():
        env = make(**config)
        try:
            obs, _ = env.reset(seed=SEED)
            assert env.observation_space.contains(obs)
            images[name] = obs if name.startswith("image") else obs["image"]
            if name.startswith("image"):
                assert isinstance(env.observation_space, gym.spaces.Box)
        finally:
            env.close()
    assert images["dict"].shape == (*TINY, 3) and images["image-chw"].shape == (3, *TINY)
    np.testing.assert_array_equal(images["image"], images["dict"])
    np.testing.assert_array_equal(images["image-chw"], images["dict"].transpose(2, 0, 1))
    np.testing.assert_array_equal(images["dict-chw"], images["image-chw"])
    assert images["image-chw"].flags.c_contiguous


def test_channels_first_side_cameras_share_the_layout():
    env = make(channels_first=True, cameras=("center", "right"))
    try:
        obs, info = env.reset(seed=SEED)
        assert obs["image"].shape == info["frames"]["right"].shape == (3, *TINY)
    finally:
        env.close()


@pytest.mark.parametrize("bad, match", [({"observation": "pixels"}, "observation must be one of"),
                                        ({"observation": "image", "privileged": True}, "needs observation='dict'"),
                                        ({"channels_first": "yes"}, "channels_first")])
def test_bad_observation_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        make(**bad)


def test_box_only_wrappers_take_the_image_mode():
    from gymnasium.wrappers import GrayscaleObservation, NormalizeObservation, ResizeObservation

    env = NormalizeObservation(GrayscaleObservation(ResizeObservation(make(observation="image"), (8, 16))))
    try:
        obs, _ = env.reset(seed=SEED)
        assert obs.shape == (8, 16) and env.observation_space.shape == (8, 16)
        for t in range(5):
            obs, _, _, _, _ = env.step(weave(t))
        assert obs.dtype == np.float32 and np.isfinite(obs).all()
        assert abs(float(obs.mean())) < 3.0  # standardised by the running statistics
        assert env.obs_rms.count > 5
    finally:
        env.close()


def documented_example(title: str) -> str:
    """The python code block under ``title`` in docs/environment.md."""
    text = DOC.read_text()
    section = text[text.index(title):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_sac_example_runs(one_thread):
    """SAC with CnnPolicy and VecNormalize on channels-first images: the docs' code, as written
    (SB3 then needs no VecTransposeImage, whose absence is what makes VecNormalize work)."""
    from stable_baselines3.common.vec_env import VecNormalize, VecTransposeImage

    namespace: dict = {}
    exec(compile(documented_example("### SAC on camera images"), str(DOC), "exec"), namespace)  # our own docs
    model, venv = namespace["model"], namespace["venv"]
    try:
        assert model.num_timesteps == 32
        assert isinstance(model.get_env(), VecNormalize)
        assert not isinstance(model.get_env().venv, VecTransposeImage)
        stored = model.replay_buffer.observations[:model.replay_buffer.pos]
        assert stored.shape == (32, 1, 3, *CNN_SIZE) and stored.dtype == np.uint8 and stored.std() > 0
        assert model._n_updates > 0  # it learned: gradient steps after learning_starts
    finally:
        venv.close()


# ---------------------------------------------------------------- python -O
OPTIMIZED_CHECKS = r"""
import json, sys
import numpy as np
from steerloop.sim.camera import CameraSpec
from steerloop.sim.controllers import LaneFeatures
from steerloop.sim.env import LaneKeepEnv

results = {"optimize": sys.flags.optimize}

def error(call):
    try:
        call()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"

env = LaneKeepEnv(track=TRACK, resolution=(16, 32))
results["step_before_reset"] = error(lambda: env.step(np.zeros(1, np.float32)))
env.close()
results["fov"] = error(lambda: LaneKeepEnv(track=TRACK, fov_deg=500))
results["pitch"] = error(lambda: LaneKeepEnv(track=TRACK, camera_pitch_deg=-90))
results["camera_spec"] = error(lambda: CameraSpec(fov_deg=1.0))
results["features"] = error(lambda: LaneFeatures.from_array(np.zeros(3)))
print(json.dumps(results))
"""


def test_checks_hold_under_python_optimize():
    code = OPTIMIZED_CHECKS.replace("TRACK", repr(SHORT_SPEC))
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120, check=True)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results.pop("optimize") == 1  # asserts are stripped in this interpreter
    assert results == {
        "step_before_reset": "RuntimeError: LaneKeepEnv.step() called before reset(); call env.reset(seed=...) first",
        "fov": "ValueError: fov_deg must be within [5, 150] degrees, got 500",
        "pitch": "ValueError: camera_pitch_deg must be within [-45, 80] degrees, got -90",
        "camera_spec": "ValueError: fov_deg must be within [5, 150] degrees, got 1.0",
        "features": "ValueError: privileged feature vector must have 67 values, got shape (3,); create the env with "
                    "privileged=True and pass observation['privileged']",
    }
