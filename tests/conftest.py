"""Shared fixtures for the steerloop test-suite: tiny, fast environments on short tracks."""

from __future__ import annotations

import copy
import json

import gymnasium as gym
import pytest

import steerloop.sim  # noqa: F401  (registers steerloop/LaneKeep-v0)

from helpers import SHORT_SPEC, TINY


@pytest.fixture
def short_spec() -> dict:
    """A fresh copy of the short spec (tests may mutate it)."""
    return copy.deepcopy(SHORT_SPEC)


@pytest.fixture
def short_spec_path(tmp_path) -> str:
    """The short spec written to a JSON file."""
    path = tmp_path / "short.json"
    path.write_text(json.dumps(SHORT_SPEC))
    return str(path)


@pytest.fixture
def make_env():
    """Factory: ``make_env(**config)`` -> a ``gym.make``'d LaneKeep env on the short spec at
    tiny resolution (override anything); every env is closed after the test."""
    envs = []

    def factory(**config):
        kwargs = {"track": copy.deepcopy(SHORT_SPEC), "resolution": TINY, **config}
        env = gym.make("steerloop/LaneKeep-v0", **kwargs)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        env.close()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight concurrent jobs for the 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance with 2 CPUs, started by the first test that needs it and shut
    down at the end of the session; ``backend="ray"`` runs use this connection."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
