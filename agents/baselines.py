"""Trivial baselines: the all-zeros predictor (always drive straight ahead)."""

from __future__ import annotations

import numpy as np

from steerloop.agents.protocol import PolicyBase


class ZerosPolicy(PolicyBase):
    """Predicts steering 0 everywhere; the reference row in every offline table."""

    requires_privileged = False
    recurrent = False

    def reset(self) -> None:
        """Stateless."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        speed = np.asarray(observation["speed"])
        batched = speed.ndim == 2
        n = speed.shape[0] if batched else 1
        actions = np.zeros((n, 1), dtype=np.float32)
        return (actions if batched else actions[0]), state

    def describe(self) -> dict:
        return {"kind": "zeros"}
