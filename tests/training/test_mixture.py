"""DAgger mechanics: recording with an expert/learner mixture, labels always the expert's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from steerloop.agents.checkpoint import save_checkpoint
from steerloop.agents.experts import ExpertPolicy
from steerloop.agents.mixture import MixturePolicy
from steerloop.agents.models import ModelConfig, build_model
from steerloop.agents.preprocess import PreprocessConfig
from steerloop.sim.env import LaneKeepEnv
from steerloop.driving_log import DrivingLog
from steerloop.training.record import RecordConfig, record

from helpers import SHORT_SPEC

TINY = (16, 32)


@pytest.fixture(scope="module")
def learner(tmp_path_factory) -> str:
    """An untrained cnn-lstm checkpoint: a learner that drives badly, as DAgger's first ones do."""
    torch.manual_seed(0)
    config = ModelConfig(arch="cnn-lstm", hidden=8, preprocess=PreprocessConfig(crop_top=4, resize=TINY))
    path = tmp_path_factory.mktemp("learner") / "ckpt"
    save_checkpoint(path, build_model(config), config, {"note": "untrained"})
    return str(path)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("spec") / "short.json"
    path.write_text(json.dumps(SHORT_SPEC))
    return str(path)


def _record(tmp_path, name, spec, **overrides):
    cfg = RecordConfig(out=str(tmp_path / name), episodes=1, track=spec, resolution=TINY, **overrides)
    record(cfg, progress=False)
    return DrivingLog(cfg.out).read_episode(0)


def test_beta_one_reproduces_plain_expert_recording(tmp_path, spec, learner):
    plain = _record(tmp_path, "plain", spec)
    mixed = _record(tmp_path, "mixed", spec, learner=learner, beta=1.0)
    assert plain.keys() == mixed.keys()
    for key in plain:
        assert np.array_equal(plain[key], mixed[key]), key


def test_beta_zero_lets_the_learner_drive_and_labels_stay_the_experts(tmp_path, spec, learner):
    data = _record(tmp_path, "learner", spec, learner=learner, beta=0.0)
    assert not np.allclose(data["steering"], data["expert_steering"])
    # The label is the expert's command at the state the learner visited: replay the
    # executed commands in a fresh simulator and recompute the expert at every state.
    attrs = DrivingLog(tmp_path / "learner").manifest["episodes"]["0"]["attrs"]
    env = LaneKeepEnv(resolution=TINY, privileged=True)
    _, info = env.reset(seed=attrs["seed"], options={"track": SHORT_SPEC, "condition": "default"})
    for executed, label in zip(data["steering"], data["expert_steering"]):
        assert info["expert_steering"] == pytest.approx(float(label), abs=1e-6)
        _, _, terminated, _, info = env.step(np.array([executed], np.float32))
    env.close()


def test_mixture_policy_coin_per_step_and_per_episode():
    class Constant:
        recurrent = False

        def reset(self):
            pass

        def predict(self, observation, state=None, episode_start=None, deterministic=True):
            return np.full((len(observation["privileged"]), 1), 0.5, np.float32), state

    from steerloop.sim.controllers import FEATURE_SIZE

    obs = {"privileged": np.zeros((4, FEATURE_SIZE), np.float32)}
    obs["privileged"][:, 7:] = np.tile(np.c_[np.arange(1.0, 31.0), np.zeros(30)], (4, 1, 1)).reshape(4, -1)
    step = MixturePolicy(ExpertPolicy(), Constant(), beta=0.3, mode="step", seed=1)
    drove = []
    for _ in range(500):
        step.predict(obs)
        drove.append(step.last_expert_drove.copy())
    assert np.mean(drove) == pytest.approx(0.3, abs=0.05)
    episode = MixturePolicy(ExpertPolicy(), Constant(), beta=0.5, mode="episode", seed=1)
    first = episode.predict(obs, episode_start=np.ones(4, bool))[0]
    coins = episode.last_expert_drove.copy()
    for _ in range(20):
        episode.predict(obs, episode_start=np.zeros(4, bool))
        assert np.array_equal(episode.last_expert_drove, coins)
    assert first.shape == (4, 1)
    with pytest.raises(ValueError, match="beta"):
        MixturePolicy(ExpertPolicy(), Constant(), beta=1.5)
