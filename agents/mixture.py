"""The DAgger mixture policy: the expert drives with probability beta, otherwise the learner.

Both are queried at every step, so a recurrent learner's hidden state always covers the
whole episode it has seen, whoever actually steered. The coin is flipped per step or once
per episode, from a seeded generator of its own.
"""

from __future__ import annotations

import numpy as np

from steerloop.agents.experts import ExpertPolicy
from steerloop.agents.protocol import Policy, PolicyBase, check_actions, policy_capabilities

MIXTURE_MODES = ("step", "episode")


class MixturePolicy(PolicyBase):
    """Expert with probability ``beta``, else ``learner`` (any :class:`Policy`); called on a
    batch. A learner that returns a wrong shape, dtype or NaN raises ``ActionError``."""

    requires_privileged = True  # the expert needs observation["privileged"]

    def __init__(self, expert: ExpertPolicy, learner: Policy, beta: float, mode: str = "step", seed: int = 0):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be within [0, 1] (probability that the expert drives), got {beta}")
        if mode not in MIXTURE_MODES:
            raise ValueError(f"mixture mode must be one of {MIXTURE_MODES}, got {mode!r}")
        self.expert, self.learner = expert, learner
        self.learner_capabilities = policy_capabilities(learner)
        self.beta, self.mode = float(beta), mode
        self.rng = np.random.default_rng(seed)
        self.recurrent = self.learner_capabilities.recurrent
        self._episode_coin = np.zeros(0, bool)
        self.last_expert_drove = np.zeros(0, bool)

    def reset(self) -> None:
        self.learner.reset()

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """(actions, learner state); ``last_expert_drove`` (N,) tells who steered each env."""
        expert_actions, _ = self.expert.predict(observation)
        expert_actions = np.asarray(expert_actions, np.float32)
        n = expert_actions.shape[0] if expert_actions.ndim == 2 else 1
        learner_actions, state = self.learner.predict(observation, state=state, episode_start=episode_start,
                                                      deterministic=True)
        learner_actions = check_actions(learner_actions, n)
        if self.mode == "step":
            coin = self.rng.uniform(size=n) < self.beta
        else:
            if self._episode_coin.shape != (n,):
                self._episode_coin = self.rng.uniform(size=n) < self.beta
            if episode_start is not None:
                starts = np.asarray(episode_start, bool).reshape(-1)
                self._episode_coin[starts] = self.rng.uniform(size=int(starts.sum())) < self.beta
            coin = self._episode_coin.copy()
        self.last_expert_drove = coin
        chosen = np.where(coin.reshape(-1, 1), expert_actions.reshape(n, -1), learner_actions.reshape(n, -1))
        return (chosen if expert_actions.ndim == 2 else chosen[0]), state

    def describe(self) -> dict:
        return {"kind": "mixture", "beta": self.beta, "mode": self.mode, "expert": self.expert.describe(),
                "learner": self.learner_capabilities.describe()}
