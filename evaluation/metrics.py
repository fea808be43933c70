"""Closed-loop drift metrics of one episode, exactly as defined in DESIGN.md.

A trajectory is a dict of equal-length 1-D arrays, one entry per control step after the
reset (the reset state itself is not counted): ``lateral_offset`` [m], ``heading_error``
[rad], ``progress`` [m], ``steering`` and ``expert_steering`` (normalised commands).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_DEPARTURE_THRESHOLD = 1.0  # [m]


def departure_events(offset: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the steps where |offset| first exceeds ``threshold`` (rising edges)."""
    outside = np.abs(np.asarray(offset)) > threshold
    previous = np.concatenate([[False], outside[:-1]])
    return np.flatnonzero(outside & ~previous)


def drift_metrics(trajectory: dict, *, dt: float, route_length: float, reached_end: bool,
                  departure_threshold: float = DEFAULT_DEPARTURE_THRESHOLD) -> dict:
    """Drift, departure and steering metrics of one closed-loop episode."""
    offset = np.asarray(trajectory["lateral_offset"], dtype=np.float64)
    heading = np.asarray(trajectory["heading_error"], dtype=np.float64)
    progress = np.asarray(trajectory["progress"], dtype=np.float64)
    steering = np.asarray(trajectory["steering"], dtype=np.float64)
    expert = np.asarray(trajectory["expert_steering"], dtype=np.float64)
    n = len(offset)
    if n == 0:
        raise ValueError("cannot compute metrics of an empty trajectory (the episode ended at reset)")
    abs_offset = np.abs(offset)
    events = departure_events(offset, departure_threshold)
    distance = float(progress[-1] - progress[0]) if n > 1 else 0.0
    first = int(events[0]) if len(events) else None
    completion_distance = progress[first] if first is not None else (progress[-1] if not reached_end else route_length)
    return {
        "steps": n,
        "duration_s": n * dt,
        "distance_m": distance,
        "mean_abs_offset_m": float(abs_offset.mean()),
        "max_abs_offset_m": float(abs_offset.max()),
        "rms_heading_error_rad": float(math.sqrt(np.mean(heading ** 2))),
        "time_outside_lane_s": float(np.count_nonzero(abs_offset > departure_threshold) * dt),
        "integrated_deviation_m_s": float(abs_offset.sum() * dt),
        "departures": int(len(events)),
        "departures_per_km": float(len(events) / (distance / 1000.0)) if distance > 0 else float("nan"),
        "time_to_first_departure_s": float((first + 1) * dt) if first is not None else None,
        "distance_to_first_departure_m": float(progress[first]) if first is not None else None,
        "route_completion": float(np.clip(completion_distance / route_length, 0.0, 1.0)),
        "success": bool(reached_end and len(events) == 0),
        "on_policy_rmse": float(math.sqrt(np.mean((steering - expert) ** 2))),
        "smoothness_per_s": float(np.mean(np.abs(np.diff(steering))) / dt) if n > 1 else 0.0,
    }
