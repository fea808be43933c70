"""Drive one closed-loop episode with any policy and keep its per-step trajectory."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evaluation.metrics import drift_metrics
from evaluation.video import VideoWriter, compose_frame

# Per-step series kept in a trajectory (all (T,) arrays; T = number of control steps).
TRAJECTORY_KEYS = ("time", "x", "y", "yaw", "progress", "lateral_offset", "heading_error", "curvature", "speed",
                   "steering", "expert_steering", "wheel_angle", "perturbation_phase", "policy_overridden",
                   "intervention")


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


def rollout(env, policy, *, seed: int | None = None, options: dict | None = None,
            video: str | None = None, max_steps: int | None = None) -> Episode:
    """Drive ``policy`` in ``env`` from ``reset(seed, options)`` until the episode ends.

    The policy is called with the SB3 contract, ``episode_start`` true on the first step,
    its recurrent ``state`` carried from step to step. Step t of the trajectory holds the
    steering executed at step t (a perturbation wrapper may override the policy), the
    expert's label for the state that steering was chosen in, and the state reached.
    """
    base = env.unwrapped
    obs, info = env.reset(seed=seed, options=options)
    if hasattr(policy, "reset"):
        policy.reset()
    series = {key: [] for key in TRAJECTORY_KEYS}
    state, start = None, np.ones((1,), dtype=bool)
    writer = VideoWriter(video) if video else None
    terminated = truncated = False
    steps = 0
    label = info["expert_steering"]  # the expert's command for the state the policy acts on
    try:
        while not (terminated or truncated):
            action, state = policy.predict(obs, state=state, episode_start=start, deterministic=True)
            start = np.zeros((1,), dtype=bool)
            obs, _, terminated, truncated, info = env.step(np.asarray(action, dtype=np.float32).reshape(-1))
            steps += 1
            for key in TRAJECTORY_KEYS:
                series[key].append(info.get(key, 0))
            series["lateral_offset"][-1] = info.get("offset_before_intervention", info["lateral_offset"])
            series["expert_steering"][-1] = label
            label = info["expert_steering"]
            if writer is not None:
                caption = f"t={info['time']:5.1f}s offset={info['lateral_offset']:+.2f}m steer={info['steering']:+.2f}"
                writer.append(compose_frame(obs["image"], base.top_down(), caption))
            if max_steps is not None and steps >= max_steps:
                truncated = True
    finally:
        if writer is not None:
            writer.close()
    trajectory = {key: np.asarray(values) for key, values in series.items()}
    metrics = drift_metrics(trajectory, dt=base.dt, route_length=base.route_length,
                            reached_end=bool(info.get("success", False)),
                            departure_threshold=base.config.departure_threshold)
    return Episode(trajectory=trajectory, metrics=metrics, success=metrics["success"],
                   off_road=bool(info.get("off_road", False)), truncated=bool(truncated),
                   interventions=int(info.get("interventions", 0)),
                   info={"track": info["track"], "condition": info["condition"], "route_length": base.route_length})
