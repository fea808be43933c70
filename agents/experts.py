"""Privileged expert drivers behind the stable-baselines3 ``predict`` contract.

The experts read ``observation["privileged"]`` (create the env with ``privileged=True``),
the true lane features of :class:`sim.controllers.LaneFeatures`, and apply the Stanley or
pure-pursuit law. :class:`NoisyExpert` executes expert + noise while exposing the clean
expert label, as DART (Laskey et al. 2017) records demonstrations.
"""

from __future__ import annotations

import math

import numpy as np

from steerloop.agents.protocol import PolicyBase
from steerloop.sim.controllers import CONTROLLERS, DEFAULT_EXPERT, LaneFeatures
from steerloop.sim.vehicle import VehicleParams

OU_THETA = 0.5  # [1/s] mean reversion rate of the Ornstein-Uhlenbeck steering noise
NOISE_KINDS = ("gaussian", "ou")


def _as_batch(observation: dict) -> tuple[np.ndarray, bool]:
    if not isinstance(observation, dict) or "privileged" not in observation:
        raise KeyError(
            "the expert needs observation['privileged']: create the env with privileged=True, e.g. "
            "gym.make('steerloop/LaneKeep-v0', privileged=True)")
    features = np.asarray(observation["privileged"], dtype=np.float64)
    batched = features.ndim == 2
    return (features if batched else features[None]), batched


class ExpertPolicy(PolicyBase):
    """Stanley or pure pursuit on the true lane geometry; deterministic, stateless."""

    requires_privileged = True
    recurrent = False

    def __init__(self, law: str = DEFAULT_EXPERT, vehicle: VehicleParams | None = None):
        if law not in CONTROLLERS:
            raise ValueError(f"expert law must be one of {sorted(CONTROLLERS)}, got {law!r}")
        self.law_name = law
        self.law = CONTROLLERS[law]
        self.vehicle = vehicle or VehicleParams()

    def reset(self) -> None:
        """Nothing to forget: the expert has no memory."""

    def command(self, features: np.ndarray) -> float:
        """Normalised steering for one privileged feature vector."""
        return self.law(LaneFeatures.from_array(features), self.vehicle.wheelbase, self.vehicle.max_wheel_angle)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        """SB3 contract: (actions (N, 1) or (1,), state). ``state`` passes through unchanged."""
        batch, batched = _as_batch(observation)
        actions = np.array([[self.command(row)] for row in batch], dtype=np.float32)
        return (actions if batched else actions[0]), state

    def describe(self) -> dict:
        return {"kind": "expert", "law": self.law_name}


class NoisyExpert(PolicyBase):
    """Executes expert + noise (Gaussian or Ornstein-Uhlenbeck) and keeps the clean label.

    After each ``predict`` call, ``last_labels`` holds the clean expert commands (N,) for
    the same observations. Noise is drawn from its own seeded generator, one process per
    environment in the batch; ``episode_start`` resets the OU state of those environments.
    """

    requires_privileged = True
    recurrent = False

    def __init__(self, expert: ExpertPolicy, scale: float, kind: str = "gaussian", seed: int = 0,
                 dt: float = 0.05):
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"noise scale must be >= 0 (normalised steering units), got {scale}")
        self.expert = expert
        self.scale = float(scale)
        self.kind = kind
        self.dt = dt
        self.rng = np.random.default_rng(seed)
        self.ou_state = np.zeros(0)
        self.last_labels = np.zeros(0, np.float32)

    def reset(self) -> None:
        self.ou_state = np.zeros(0)

    def _noise(self, n: int, episode_start) -> np.ndarray:
        if self.kind == "gaussian":
            return self.rng.normal(0.0, self.scale, n)
        if self.ou_state.shape != (n,):
            self.ou_state = np.zeros(n)
        if episode_start is not None:
            self.ou_state[np.asarray(episode_start, bool).reshape(-1)] = 0.0
        # Exact discretisation of dx = -theta x dt + sigma sqrt(2 theta) dW (stationary std = scale).
        decay = math.exp(-OU_THETA * self.dt)
        self.ou_state = decay * self.ou_state + self.scale * math.sqrt(1 - decay ** 2) * self.rng.normal(0.0, 1.0, n)
        return self.ou_state.copy()

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        batch, batched = _as_batch(observation)
        labels = np.array([self.expert.command(row) for row in batch])
        self.last_labels = labels.astype(np.float32)
        executed = np.clip(labels + self._noise(len(batch), episode_start), -1.0, 1.0).astype(np.float32)[:, None]
        return (executed if batched else executed[0]), state

    def describe(self) -> dict:
        return {"kind": "noisy_expert", "law": self.expert.law_name, "noise": self.kind, "scale": self.scale}
