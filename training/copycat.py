"""How much of an action sequence its own past explains: the copycat probe and keyframe weights.

A policy that sees its previous commands can score a low offline error by repeating them
(the copycat problem: de Haan et al. 2019, Wen et al. 2020). Both tools here rest on one
small regression, fitted with numpy least squares: the action at t from the previous k
actions alone (plus an intercept), with a light ridge penalty.

- :func:`copycat_probe` (after Wen et al. 2020): how well the previous k actions predict
  the next one in a set of sequences, as R^2 and the RMSE of what they leave unexplained.
  Run on the expert's logged sequences and on a policy's closed-loop sequences, the ratio
  of the unexplained variances says whether the policy is more predictable from its own
  past than the expert it imitates (ratio < 1: it repeats itself more than the expert did).
- :func:`keyframe_weights` (after Wen et al. 2021, keyframe-focused imitation): per-frame
  loss weights that grow with that regression's error, so the frames where the command
  changes in a way its history does not predict (the keyframes) count more in training.
"""

from __future__ import annotations

import math

import numpy as np

PROBE_HISTORY = 4  # [steps] previous actions the probe sees (0.2 s at 20 Hz)
RIDGE = 1e-6  # ridge penalty per sample on the history coefficients (not the intercept)


def history_design(histories: list[np.ndarray], targets: list[np.ndarray], k: int, pad: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Rows [h_{t-1}, ..., h_{t-k}] and targets a_t over every sequence, never across two.

    ``pad``: every step is a row, with 0 before a sequence's start (as a fed-back input is at
    an episode's start); else only steps with k actions before them. Returns (X (M, k),
    y (M,), rows per sequence)."""
    if k < 1:
        raise ValueError(f"the history regression needs k >= 1 previous actions, got {k}")
    xs, ys, counts = [], [], []
    for history, target in zip(histories, targets):
        history = np.asarray(history, np.float64).reshape(-1)
        target = np.asarray(target, np.float64).reshape(-1)
        if len(history) != len(target):
            raise ValueError(f"a history of {len(history)} steps and {len(target)} targets: one each per step")
        padded = np.concatenate([np.zeros(k), history])  # padded[k + t] = history[t]
        steps = np.arange(len(target)) if pad else np.arange(k, len(target))
        columns = [padded[k + steps - lag] for lag in range(1, k + 1)]  # h_{t-1} .. h_{t-k}
        xs.append(np.stack(columns, axis=1) if len(steps) else np.zeros((0, k)))
        ys.append(target[steps])
        counts.append(len(steps))
    return np.concatenate(xs), np.concatenate(ys), counts


def fit_history(x: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Coefficients (k + 1,) (intercept last) of the ridge least-squares fit y ~ x."""
    n, k = x.shape
    a = np.concatenate([x, np.ones((n, 1))], axis=1)
    penalty = np.sqrt(ridge * max(n, 1)) * np.eye(k + 1)[:k]  # extra rows: ridge on the history terms only
    coef, *_ = np.linalg.lstsq(np.concatenate([a, penalty]), np.concatenate([y, np.zeros(k)]), rcond=None)
    return coef


def predict_history(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return x @ coef[:-1] + coef[-1]


def copycat_probe(sequences: list[np.ndarray], k: int = PROBE_HISTORY) -> dict:
    """How well the previous ``k`` actions alone predict the next, over ``sequences`` (one
    (N_i,) array of actions per episode): ``r2``, ``unexplained`` (1 - R^2), ``rmse`` of
    the residual, ``std`` of the actions, ``frames`` used. Values are None when fewer than
    k + 2 steps are available or the actions never vary."""
    x, y, _ = history_design(sequences, sequences, k)
    out = {"k": k, "frames": int(len(y)), "r2": None, "unexplained": None, "rmse": None,
           "std": float(np.std(y)) if len(y) else None}
    if len(y) < k + 2 or float(np.var(y)) == 0.0:
        return out
    residual = y - predict_history(x, fit_history(x, y))
    unexplained = float(np.mean(residual ** 2) / np.var(y))
    out.update(r2=1.0 - unexplained, unexplained=unexplained, rmse=float(math.sqrt(np.mean(residual ** 2))))
    return out


def probe_ratio(policy: dict, expert: dict) -> float | None:
    """The policy's unexplained variance over the expert's: < 1 means the policy's actions
    are more predictable from its own past actions than the expert's were."""
    if policy.get("unexplained") is None or not expert.get("unexplained"):
        return None
    return policy["unexplained"] / expert["unexplained"]


def keyframe_weights(histories: list[np.ndarray], targets: list[np.ndarray], strength: float,
                     k: int = PROBE_HISTORY, fit_on: list[int] | None = None) -> list[np.ndarray]:
    """Per-step loss weights (one (N_i,) float32 array per sequence), mean 1 over the
    sequences ``fit_on`` (default all): w_t proportional to 1 + strength * |e_t| / mean|e|,
    where e_t is the error of the history regression of ``targets`` on the previous ``k``
    values of ``histories`` (the inputs a fed-back model sees), fitted on ``fit_on``."""
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"keyframe strength must be a finite number >= 0, got {strength}")
    fit_on = list(range(len(targets))) if fit_on is None else list(fit_on)
    x, y, _ = history_design([histories[i] for i in fit_on], [targets[i] for i in fit_on], k, pad=True)
    coef = fit_history(x, y)
    mean_error = float(np.mean(np.abs(y - predict_history(x, coef)))) or 1.0
    raw = []
    for history, target in zip(histories, targets):
        xi, yi, _ = history_design([history], [target], k, pad=True)
        raw.append(1.0 + strength * np.abs(yi - predict_history(xi, coef)) / mean_error)
    scale = float(np.mean(np.concatenate([raw[i] for i in fit_on])))
    return [(w / scale).astype(np.float32) for w in raw]
