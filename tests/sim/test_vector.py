"""LaneKeep in vectorised environments: gymnasium's AsyncVectorEnv and stable-baselines3's
SubprocVecEnv (subprocesses started by forkserver / spawn), each sub-environment seeded
on its own; vectorised rollouts equal serial ones bit for bit."""

from __future__ import annotations

import functools
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AsyncVectorEnv
from stable_baselines3.common.vec_env import SubprocVecEnv

from steerloop import ENV_ID_PREFIXED
from helpers import TINY

# "steerloop:" makes gym.make import steerloop (which registers the env) in a fresh subprocess.
ENV_ID = ENV_ID_PREFIXED
assert ENV_ID == "steerloop:steerloop/LaneKeep-v0"  # the form the README shows
CONFIG = {"resolution": TINY, "track_length": 60.0}  # a procedural training track drawn from each env's seed
STEPS = 30  # [control steps] short of any route end or departure
SEEDS = [11, 12]


def make_env():
    return functools.partial(gym.make, ENV_ID, **CONFIG)


def actions(n_envs: int) -> np.ndarray:
    """A fixed, different steering sequence per environment: (STEPS, n_envs, 1)."""
    t = np.arange(STEPS)[:, None, None]
    phase = np.arange(n_envs)[None, :, None]
    return (0.15 * np.sin(0.2 * t + phase)).astype(np.float32)


def serial_rollout(seed: int, sequence: np.ndarray) -> tuple[list[dict], list[float], list[bool]]:
    """The observations (after reset and after every step), rewards and terminations of one env."""
    env = make_env()()
    try:
        obs, _ = env.reset(seed=seed)
        observations, rewards, dones = [obs], [], []
        for action in sequence:
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            rewards.append(reward)
            dones.append(terminated or truncated)
    finally:
        env.close()
    return observations, rewards, dones


@pytest.fixture(scope="module")
def serial():
    sequences = actions(len(SEEDS))
    return sequences, [serial_rollout(seed, sequences[:, i]) for i, seed in enumerate(SEEDS)]


def _assert_matches(serial_runs, step: int, obs: dict, rewards=None, dones=None):
    for i, (observations, serial_rewards, serial_dones) in enumerate(serial_runs):
        for key in ("image", "speed"):
            np.testing.assert_array_equal(obs[key][i], observations[step][key],
                                          err_msg=f"env {i}: observation[{key!r}] differs at step {step}")
        if rewards is not None:
            assert rewards[i] == serial_rewards[step - 1], f"env {i}: reward differs at step {step}"
            assert bool(dones[i]) is serial_dones[step - 1] is False


def test_async_vector_env_equals_serial_envs(serial):
    sequences, runs = serial
    envs = AsyncVectorEnv([make_env() for _ in SEEDS], context="forkserver")
    try:
        assert envs.single_observation_space["image"].shape == (*TINY, 3)
        obs, _ = envs.reset(seed=SEEDS)
        assert not np.array_equal(obs["image"][0], obs["image"][1])  # per-env seeds: different tracks
        _assert_matches(runs, 0, obs)
        for step, action in enumerate(sequences, start=1):
            obs, rewards, terminated, truncated, _ = envs.step(action)
            _assert_matches(runs, step, obs, rewards, terminated | truncated)
    finally:
        envs.close()


@pytest.mark.slow  # ~5 s; the string-id test drives SubprocVecEnv-style workers in the default suite
def test_sb3_subproc_vec_env_equals_serial_envs(serial):
    sequences, runs = serial
    assert SEEDS[1] == SEEDS[0] + 1  # SB3 seeds sub-environment i with seed + i
    venv = SubprocVecEnv([make_env() for _ in SEEDS], start_method="spawn")
    try:
        venv.seed(SEEDS[0])
        obs = venv.reset()
        _assert_matches(runs, 0, obs)
        for step, action in enumerate(sequences, start=1):
            obs, rewards, dones, _ = venv.step(action)
            _assert_matches(runs, step, obs, rewards, dones)
    finally:
        venv.close()


# A parent that is plain ``python -c`` (not pytest, which has imported steerloop already):
# the documented id, as a string, works in children started by spawn and forkserver.
PARENT_SCRIPT = """
import sys
import gymnasium as gym
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

method = sys.argv[1]
config = dict(resolution=(16, 32), track_length=60.0)
venv = make_vec_env("steerloop:steerloop/LaneKeep-v0", n_envs=2, seed=3, vec_env_cls=SubprocVecEnv,
                    vec_env_kwargs=dict(start_method=method), env_kwargs=config)
obs = venv.reset()
venv.close()
envs = gym.make_vec("steerloop:steerloop/LaneKeep-v0", num_envs=2, vectorization_mode="async",
                    vector_kwargs=dict(context=method), **config)
first, _ = envs.reset(seed=3)
envs.close()
print(obs["image"].shape, first["image"].shape)
"""


@pytest.mark.parametrize("method", ["spawn", pytest.param("forkserver", marks=pytest.mark.slow)])
def test_string_id_from_a_plain_python_parent(method, tmp_path):
    result = subprocess.run([sys.executable, "-c", PARENT_SCRIPT, method], capture_output=True, text=True,
                            timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "(2, 16, 32, 3) (2, 16, 32, 3)"
