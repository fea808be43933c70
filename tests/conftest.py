"""Shared fixtures for the steerloop test-suite: tiny, fast environments on short tracks."""

from __future__ import annotations

import copy
import json

import gymnasium as gym
import numpy as np
import pytest

import steerloop.sim  # noqa: F401  (registers steerloop/LaneKeep-v0)

TINY = (16, 32)  # (H, W) [px]: the smallest images worth rendering; keeps every test fast

# 40 m straight + 25 m radius, 60 deg left arc + 20 m straight: ~76 m of route, ~150 steps at 10 m/s.
SHORT_SPEC = {
    "name": "short",
    "lane_width": 3.7,
    "segments": [
        {"type": "straight", "length": 40},
        {"type": "arc", "radius": 25, "angle": 60},
        {"type": "straight", "length": 20},
    ],
}


def straight_spec(length: float = 150.0) -> dict:
    """A single straight of ``length`` metres (clean geometry for perturbation checks)."""
    return {"name": f"straight-{length:g}", "lane_width": 3.7, "segments": [{"type": "straight", "length": length}]}


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


def drive_with_expert_label(env, *, seed: int = 0, options: dict | None = None, max_steps: int = 5000):
    """Drive ``env`` with ``info["expert_steering"]`` (no privileged observation needed).

    Returns (last info, list of infos of every step)."""
    _, info = env.reset(seed=seed, options=options)
    infos = []
    for _ in range(max_steps):
        _, _, terminated, truncated, info = env.step(np.array([info["expert_steering"]], np.float32))
        infos.append(info)
        if terminated or truncated:
            break
    return info, infos


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
