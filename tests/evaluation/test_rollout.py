"""Batched closed-loop rollouts (evaluation.rollout.rollout_batch): finished episodes leave
the batch of a policy that can select its state, and nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steerloop.agents.models import ModelConfig, build_model
from steerloop.agents.policy import LearnedPolicy
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.evaluation.rollout import rollout_batch
from steerloop.sim.env import LaneKeepEnv

from helpers import TINY, straight_spec

LENGTHS = (30.0, 60.0, 45.0)  # [m] straights of different lengths: the episodes end at different steps


class Recorder:
    """Wraps a policy and records the batch size of every ``predict`` call."""

    def __init__(self, policy, shrink: bool):
        self.policy = policy
        self.sizes: list[int] = []
        if shrink:
            self.select_state = policy.select_state

    def reset(self):
        self.policy.reset()

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        self.sizes.append(len(observation["image"]))
        return self.policy.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm", preprocess=PreprocessConfig(crop_top=4, resize=(12, 32)))
    return LearnedPolicy(build_model(config), config)


def _rollout(policy):
    envs = [LaneKeepEnv(track=straight_spec(length), resolution=TINY) for length in LENGTHS]
    try:
        # Intervention-free straights: the untrained policy's drift stays small, every route is driven to its end.
        return rollout_batch(envs, policy, seeds=[0, 1, 2])
    finally:
        for env in envs:
            env.close()


def test_finished_episodes_leave_the_batch(policy):
    shrinking, full = Recorder(policy, shrink=True), Recorder(policy, shrink=False)
    episodes = _rollout(shrinking)
    reference = _rollout(full)
    steps = [len(e.trajectory["time"]) for e in episodes]
    assert len(set(steps)) == 3, f"the episodes must end at different steps to test anything, got {steps}"
    # One predict per step of the longest episode; the batch holds exactly the running episodes.
    assert shrinking.sizes == [sum(s > t for s in steps) for t in range(max(steps))]
    assert full.sizes == [3] * max(steps)
    for a, b in zip(episodes, reference):
        assert a.trajectory.keys() == b.trajectory.keys()
        for key in a.trajectory:
            np.testing.assert_allclose(a.trajectory[key], b.trajectory[key], atol=1e-5, err_msg=key)


def test_shrinking_rollouts_are_reproducible(policy):
    first, second = _rollout(policy), _rollout(policy)
    for a, b in zip(first, second):
        for key in a.trajectory:
            np.testing.assert_array_equal(a.trajectory[key], b.trajectory[key], err_msg=key)
        assert a.metrics == b.metrics


def test_select_state_keeps_the_chosen_environments(policy):
    state = tuple(np.arange(np.prod(s.shape), dtype=np.float32).reshape(s.shape) for s in policy.initial_state(3))
    keep = np.array([True, False, True])
    selected = policy.select_state(state, keep)
    for full, part, axis in zip(state, selected, policy.model.state_batch_dims):
        np.testing.assert_array_equal(part, np.take(full, [0, 2], axis=axis))
    assert policy.select_state(None, keep) is None
