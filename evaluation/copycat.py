"""History and copycat measurements on steering sequences (logged or driven).

- :func:`repeat_previous`: the "repeat the previous command" predictor, the offline score
  a pure copycat gets for free (beside every offline table, with all-zeros).
- :func:`change_points` and :func:`event_errors`: offline error split by event, at the
  steering change-points (the frames around the steps where the expert's command changes
  fastest: the top ``1 - CHANGE_QUANTILE`` of |a_t - a_{t-1}| over the dataset, widened by
  ``CHANGE_MARGIN`` steps each side) and on the steady segments (every other frame). A
  copycat is exact on steady segments and late at every change-point.
- :func:`closed_loop_probe`: the copycat probe (training.copycat) on a policy's own
  closed-loop steering, read from an evaluation's saved trajectories.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from steerloop.training.copycat import PROBE_HISTORY, copycat_probe
from steerloop.training.data import previous

CHANGE_QUANTILE = 0.9  # steps whose |change of the expert's command| is in the top 10% ...
CHANGE_MARGIN = 2  # [steps] ... and this many steps either side (0.1 s at 20 Hz) are change-points


def repeat_previous(executed: np.ndarray) -> np.ndarray:
    """The command executed at t-1 as the prediction for t (0 at the first step)."""
    executed = np.asarray(executed, np.float32)
    return previous(executed, 0, len(executed))


def change_points(labels: list[np.ndarray], quantile: float = CHANGE_QUANTILE, margin: int = CHANGE_MARGIN
                  ) -> tuple[list[np.ndarray], float]:
    """One boolean mask per episode (true at change-point frames) and the threshold on
    |a_t - a_{t-1}| (pooled ``quantile`` over every episode; nothing is a change-point if
    the command never changes)."""
    deltas = [np.abs(np.diff(np.asarray(a, np.float64), prepend=np.asarray(a, np.float64)[:1])) for a in labels]
    pooled = np.concatenate(deltas) if deltas else np.zeros(0)
    threshold = float(np.quantile(pooled, quantile)) if len(pooled) else 0.0
    masks = []
    for delta in deltas:
        fast = (delta >= threshold) & (delta > 0)
        widened = fast.copy()
        for shift in range(1, margin + 1):
            widened[shift:] |= fast[:-shift]
            widened[:-shift] |= fast[shift:]
        masks.append(widened)
    return masks, threshold


def _rmse(err: np.ndarray) -> float | None:
    return float(math.sqrt(np.mean(err ** 2))) if len(err) else None


def event_errors(predictions: list[np.ndarray], labels: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """RMSE at change-points and on steady segments (None where there is no such frame)."""
    err = np.concatenate([np.asarray(p, np.float64) - np.asarray(a, np.float64) for p, a in zip(predictions, labels)])
    at = np.concatenate(masks)
    return {"change_point_rmse": _rmse(err[at]), "steady_rmse": _rmse(err[~at]),
            "change_point_frames": int(at.sum()), "steady_frames": int((~at).sum())}


def own_runs(trajectory: dict) -> list[np.ndarray]:
    """The policy's own steering in a closed-loop trajectory, cut where a perturbation
    overrode it (those steps are not the policy's actions)."""
    steering = np.asarray(trajectory["steering"], np.float64)
    overridden = np.asarray(trajectory.get("policy_overridden", np.zeros(len(steering))), bool)
    runs, start = [], 0
    for t in np.flatnonzero(overridden).tolist() + [len(steering)]:
        if t > start:
            runs.append(steering[start:t])
        start = t + 1
    return runs


def closed_loop_probe(results_dir: str | Path, k: int = PROBE_HISTORY) -> dict:
    """The copycat probe on every saved trajectory of an evaluation (``trajectories/*.npz``)."""
    runs = []
    for path in sorted(Path(results_dir, "trajectories").glob("*.npz")):
        with np.load(path) as data:
            runs += own_runs({key: data[key] for key in ("steering", "policy_overridden") if key in data})
    return copycat_probe(runs, k)
