"""Closed-loop drift and recovery metrics of one episode, as defined in docs/metrics.md.

A trajectory is a dict of equal-length 1-D arrays, one entry per control step after the
reset (the reset state itself is not counted): ``lateral_offset`` [m] and ``heading_error``
[rad] of the wheelbase midpoint, ``rear_heading_error`` [rad] (at the rear axle; recovery
only), ``progress`` [m], ``steering`` and ``expert_steering`` (normalised commands).
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
    # Steps where a perturbation overrode the policy do not count towards its on-policy error.
    own = ~np.asarray(trajectory.get("policy_overridden", np.zeros(n, bool)), dtype=bool)
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
        "on_policy_rmse": float(math.sqrt(np.mean((steering[own] - expert[own]) ** 2))) if own.any() else None,
        "smoothness_per_s": float(np.mean(np.abs(np.diff(steering))) / dt) if n > 1 else 0.0,
    }


RECOVERY_OFFSET = 0.25  # [m] back within this of the centre line (wheelbase midpoint) ...
RECOVERY_HEADING = 3.0  # [deg] ... and this heading error at the rear axle (0 in steady turning) ...
RECOVERY_DEADLINE = 5.0  # [s] ... within this time after the perturbation ends ...
RECOVERY_HOLD = 1.0  # [s] ... and staying there this long, with no departure


def recovery_metrics(trajectory: dict, perturbations, *, dt: float,
                     departure_threshold: float = DEFAULT_DEPARTURE_THRESHOLD) -> list[dict]:
    """One record per perturbation: recovered, recovery time [s], overshoot [m] (docs/metrics.md).

    Trajectory index i holds the state after control step i + 1; a perturbation acts on
    steps ``start_step .. end_step - 1``, so the policy is back in control from index
    ``end_step - 1`` on. Recovered = |lateral_offset| <= RECOVERY_OFFSET m and
    |rear_heading_error| <= RECOVERY_HEADING deg within RECOVERY_DEADLINE s, staying there
    RECOVERY_HOLD s, with no departure from the perturbation's start until then. The heading
    is taken at the rear axle because that is where it is zero in steady turning on any arc
    (at the midpoint a perfect tracker holds about atan(1.35 / R): 3.1 deg on a 25 m arc).
    Overshoot = the largest excursion to the other side of the centre line during the
    deadline window.
    """
    if "rear_heading_error" not in trajectory:
        raise KeyError("recovery_metrics needs the trajectory's 'rear_heading_error' (info['rear_heading_error'] "
                       "of the env; record it with evaluation.rollout, whose TRAJECTORY_KEYS include it)")
    offset = np.asarray(trajectory["lateral_offset"], dtype=np.float64)
    heading = np.degrees(np.asarray(trajectory["rear_heading_error"], dtype=np.float64))
    n = len(offset)
    deadline, hold = int(round(RECOVERY_DEADLINE / dt)), int(round(RECOVERY_HOLD / dt))
    inside = (np.abs(offset) <= RECOVERY_OFFSET) & (np.abs(heading) <= RECOVERY_HEADING)
    records = []
    for q in perturbations:
        begin, release = q.start_step - 1, q.end_step - 1
        record = {"kind": q.kind, "start_step": q.start_step, "magnitude": q.magnitude, "recovered": False,
                  "recovery_time_s": None, "overshoot_m": None, "reached": release < n}
        if release >= n:
            records.append(record)
            continue
        side = np.sign(offset[release]) or 1.0
        window = offset[release:min(release + deadline + 1, n)]
        record["overshoot_m"] = float(max(0.0, np.max(-side * window)))
        for k in range(release, min(release + deadline + 1, n - hold + 1)):
            if inside[k:k + hold].all():
                departed = np.any(np.abs(offset[begin:k + hold]) > departure_threshold)
                record["recovered"] = not departed
                record["recovery_time_s"] = float((k - release) * dt) if not departed else None
                break
        records.append(record)
    return records


def autonomy_percent(interventions: int, elapsed_s: float, penalty_s: float = 6.0) -> float:
    """NVIDIA's autonomy: (1 - interventions x 6 s / elapsed s) x 100 (floored at 0)."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed time must be > 0 s, got {elapsed_s}")
    return max(0.0, (1.0 - interventions * penalty_s / elapsed_s) * 100.0)

