"""stable-baselines3 interop: an SB3 .zip drives through steerloop, steerloop policies through SB3."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy

import steerloop.sim  # noqa: F401  (registers the env)
from steerloop.agents import load_policy
from steerloop.agents.experts import ExpertPolicy
from steerloop.evaluation.runner import run_scenario
from steerloop.evaluation.suites import Scenario

from helpers import SHORT_SPEC

SB3_MIN = (36, 64)  # SB3's NatureCNN needs images of at least 36x36


@pytest.fixture(scope="module")
def ppo_zip(tmp_path_factory):
    env = gym.make("steerloop/LaneKeep-v0", track=SHORT_SPEC, resolution=SB3_MIN)
    model = PPO("MultiInputPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.learn(16)
    path = tmp_path_factory.mktemp("sb3") / "ppo.zip"
    model.save(path)
    env.close()
    return str(path)


def test_sb3_zip_is_evaluated_like_any_policy(ppo_zip):
    policy = load_policy(ppo_zip)
    assert policy.describe()["algorithm"] == "PPO"
    metrics, trajectory = run_scenario(policy, Scenario(name="sb3", track=SHORT_SPEC), resolution=SB3_MIN)
    assert metrics["steps"] == len(trajectory["steering"]) > 0
    assert np.all(np.abs(trajectory["steering"]) <= 1.0)


def test_steerloop_expert_runs_in_sb3_evaluate_policy():
    env = gym.make("steerloop/LaneKeep-v0", track=SHORT_SPEC, resolution=(16, 32), privileged=True)
    mean_reward, _ = evaluate_policy(ExpertPolicy(), env, n_eval_episodes=1, warn=False)
    env.close()
    assert mean_reward > 0  # progress dominates: the expert drives the route


def test_missing_zip_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_policy(str(tmp_path / "nope.zip"))
