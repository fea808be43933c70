"""Drive one closed-loop episode with any policy and keep its per-step trajectory."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from steerloop.agents.protocol import Policy, checked_predict, policy_capabilities
from steerloop.evaluation.metrics import drift_metrics
from steerloop.evaluation.video import VideoWriter, compose_frame

# Per-step series kept in a trajectory (all (T,) arrays; T = number of control steps).
TRAJECTORY_KEYS = ("time", "x", "y", "yaw", "progress", "lateral_offset", "heading_error", "rear_heading_error",
                   "curvature", "speed", "steering", "expert_steering", "wheel_angle", "perturbation_phase",
                   "policy_overridden", "intervention")


@dataclass
class Episode:
    """The outcome of one rollout: trajectory (dict of (T,) arrays), metrics and end flags."""

    trajectory: dict[str, np.ndarray]
    metrics: dict
    success: bool
    off_road: bool
    truncated: bool
    interventions: int = 0
    info: dict = field(default_factory=dict)


class _Run:
    """Per-environment bookkeeping of a batched rollout."""

    def __init__(self, env, obs, info, video: str | None):
        self.env = env
        self.obs = obs
        self.info = info
        self.label = info["expert_steering"]  # the expert's command for the state the policy acts on
        self.series = {key: [] for key in TRAJECTORY_KEYS}
        self.writer = VideoWriter(video) if video else None
        self.done = False
        self.truncated = False

    def record(self, obs, terminated: bool, truncated: bool, info: dict, max_steps: int | None) -> None:
        for key in TRAJECTORY_KEYS:
            self.series[key].append(info.get(key, 0))
        self.series["lateral_offset"][-1] = info.get("offset_before_intervention", info["lateral_offset"])
        self.series["expert_steering"][-1] = self.label
        self.label = info["expert_steering"]
        if self.writer is not None:
            caption = f"t={info['time']:5.1f}s offset={info['lateral_offset']:+.2f}m steer={info['steering']:+.2f}"
            self.writer.append(compose_frame(obs["image"], self.env.unwrapped.top_down(), caption))
        self.obs, self.info = obs, info
        self.truncated = truncated or (max_steps is not None and len(self.series["time"]) >= max_steps)
        self.done = terminated or self.truncated

    def episode(self) -> Episode:
        base, info = self.env.unwrapped, self.info
        trajectory = {key: np.asarray(values) for key, values in self.series.items()}
        metrics = drift_metrics(trajectory, dt=base.dt, route_length=base.route_length,
                                reached_end=bool(info.get("success", False)),
                                departure_threshold=base.config.departure_threshold)
        return Episode(trajectory=trajectory, metrics=metrics, success=metrics["success"],
                       off_road=bool(info.get("off_road", False)), truncated=bool(self.truncated),
                       interventions=int(info.get("interventions", 0)),
                       info={"track": info["track"], "condition": info["condition"],
                             "route_length": base.route_length})


def _stack(observations: list[dict]) -> dict:
    return {key: np.stack([o[key] for o in observations]) for key in observations[0]}


def rollout_batch(envs: list, policy: Policy, *, seeds: list[int | None], options: list[dict | None] | None = None,
                  videos: list[str | None] | None = None, max_steps: int | None = None,
                  names: list[str] | None = None, policy_name: str | None = None) -> list[Episode]:
    """Drive ``policy`` in several environments in lockstep, one batched ``predict`` per step.

    Observations are stacked to (N, ...) and the policy's recurrent state covers all N
    environments. When an episode ends, a policy with ``select_state(state, keep)`` (keep:
    (N,) bool; returns the state of the kept environments) is called on the remaining
    environments only; any other policy keeps being fed the finished environment's last
    observation (its actions are ignored) until every episode has ended. Either way the
    batch composition at every step follows from the episodes alone, never from timing,
    so every prediction is reproducible.

    The policy is called with the SB3 contract, ``episode_start`` true on the first step,
    its recurrent ``state`` carried from step to step. Step t of a trajectory holds the
    steering executed at step t (a perturbation wrapper may override the policy), the
    expert's label for the state that steering was chosen in, and the state reached.

    A policy whose ``predict`` raises or returns a wrong shape or dtype, or NaN, stops the
    rollout with a one-line :class:`~steerloop.agents.protocol.PolicyError` naming
    ``policy_name`` and the environment's entry of ``names`` (scenario names).
    """
    n = len(envs)
    options = options or [None] * n
    videos = videos or [None] * n
    names = [f"scenario {name}" for name in names] if names else [f"environment {i}" for i in range(n)]
    policy_name = policy_name or type(policy).__qualname__
    select_state = policy_capabilities(policy).select_state
    policy.reset()
    runs = []
    for env, seed, option, video in zip(envs, seeds, options, videos):
        obs, info = env.reset(seed=seed, options=option)
        runs.append(_Run(env, obs, info, video))
    batch, labels = list(runs), list(names)  # the runs the policy is called on
    state, start = None, np.ones((n,), dtype=bool)
    try:
        while not all(run.done for run in runs):
            actions, state = checked_predict(policy, _stack([run.obs for run in batch]), state, start,
                                             name=policy_name, where=labels)
            for run, action in zip(batch, actions):
                if not run.done:
                    obs, _, terminated, truncated, info = run.env.step(action)
                    run.record(obs, terminated, truncated, info, max_steps)
            keep = np.array([not run.done for run in batch])
            if select_state is not None and keep.any() and not keep.all():
                state = select_state(state, keep)
                batch = [run for run, kept in zip(batch, keep) if kept]
                labels = [label for label, kept in zip(labels, keep) if kept]
            start = np.zeros((len(batch),), dtype=bool)
    finally:
        for run in runs:
            if run.writer is not None:
                run.writer.close()
    return [run.episode() for run in runs]


def rollout(env, policy: Policy, *, seed: int | None = None, options: dict | None = None,
            video: str | None = None, max_steps: int | None = None, name: str | None = None,
            policy_name: str | None = None) -> Episode:
    """Drive ``policy`` in ``env`` from ``reset(seed, options)`` until the episode ends
    (:func:`rollout_batch` with one environment, ``name`` naming it in errors)."""
    return rollout_batch([env], policy, seeds=[seed], options=[options], videos=[video], max_steps=max_steps,
                         names=[name] if name else None, policy_name=policy_name)[0]
