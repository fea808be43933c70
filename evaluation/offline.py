"""Offline metrics on held-out driving logs (``steerloop offline``), as defined in docs/metrics.md.

The policy is replayed open loop along each logged episode: it sees the logged frames
one step at a time, its recurrent state carried across the episode, and its predictions
are compared with the expert labels. Every metric is reported beside the all-zeros
predictor's value. Metrics pool all frames of all episodes; windowed metrics never cross
an episode boundary.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from steerloop.sim.log import DrivingLog

WINDOW = 16  # [steps] window of the cumulative speed-weighted error
TRE_FRACTION = 0.1  # thresholded relative error: |a - a_hat| > 0.1 |a|


def offline_metrics(predictions: list[np.ndarray], labels: list[np.ndarray], speeds: list[np.ndarray],
                    dt: float) -> dict:
    """RMSE, MAE, speed-weighted MAE, cumulative speed-weighted error, QCE and TRE.

    Each argument is a list with one (N_e,) array per episode.
    """
    a_hat, a, v = (np.concatenate(x).astype(np.float64) for x in (predictions, labels, speeds))
    err = a_hat - a
    sigma = float(np.std(a))

    def bins(x):  # 0 right (< -sigma), 1 straight, 2 left (> +sigma)
        return np.digitize(x, [-sigma, sigma])

    cumulative = []
    for p, l, s in zip(predictions, labels, speeds):
        e = (np.asarray(p, np.float64) - np.asarray(l, np.float64)) * np.abs(np.asarray(s, np.float64)) * dt
        for start in range(0, len(e) - WINDOW + 1, WINDOW):
            cumulative.append(abs(e[start:start + WINDOW].sum()))
    return {
        "rmse": float(math.sqrt(np.mean(err ** 2))),
        "mae": float(np.mean(np.abs(err))),
        "speed_weighted_mae": float(np.mean(np.abs(err) * np.abs(v))),
        "cumulative_speed_weighted_error": float(np.mean(cumulative)) if cumulative else None,
        "qce": float(np.mean(bins(a_hat) != bins(a))),
        "tre": float(np.mean(np.abs(err) > TRE_FRACTION * np.abs(a))),
        "frames": int(len(a)),
    }


def replay(policy, log: DrivingLog, index: int, camera: str = "center") -> np.ndarray:
    """The policy's predictions along logged episode ``index``, step by step, state carried."""
    data = log.read_episode(index, cameras=[camera])
    frames, speed = data[f"frames/{camera}"], data["speed"]
    if getattr(policy, "requires_privileged", False):
        raise ValueError("offline replay needs a camera policy; the privileged expert cannot be replayed from logs")
    out = np.empty(len(frames), dtype=np.float32)
    state = None
    for t in range(len(frames)):
        obs = {"image": frames[t], "speed": np.array([speed[t]], np.float32)}
        action, state = policy.predict(obs, state=state, episode_start=np.array([t == 0]), deterministic=True)
        out[t] = float(np.asarray(action).reshape(-1)[0])
    return out


def evaluate_offline(policy_name: str, data: str, out: str | None = None, dt: float | None = None,
                     series: str | None = None) -> dict:
    """Offline metrics of ``policy_name`` on every episode of ``data``, beside all-zeros.

    ``series``: also save the open-loop replay as an ``.npz`` holding, per episode ``i``,
    ``prediction_i``, ``label_i`` and ``time_i`` ((N_i,) arrays; load with ``np.load``)."""
    import torch

    from steerloop.agents import load_policy

    policy = load_policy(policy_name)
    log = DrivingLog(data)
    if dt is None:
        dt = 1.0 / float(log.manifest.get("config", {}).get("control_hz", 20))
    predictions, labels, speeds, times, per_episode = [], [], [], [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one frame at a time: more threads only spin (20x slower on a busy machine)
    try:
        preds = [replay(policy, log, index) for index in log.episodes]
    finally:
        torch.set_num_threads(threads)
    for index, pred in zip(log.episodes, preds):
        episode = log.read_episode(index, cameras=[])
        predictions.append(pred)
        labels.append(episode["expert_steering"])
        speeds.append(episode["speed"])
        times.append(episode["time"])
        per_episode.append({"episode": index, "rmse": float(np.sqrt(np.mean((pred - episode["expert_steering"]) ** 2)))})
    result = {
        "policy": policy_name, "data": str(data), "episodes": len(log.episodes),
        "model": offline_metrics(predictions, labels, speeds, dt),
        "zeros": offline_metrics([np.zeros_like(p) for p in predictions], labels, speeds, dt),
        "per_episode": per_episode,
    }
    log.close()
    if series:
        arrays = {}
        for i, (pred, label, t) in enumerate(zip(predictions, labels, times)):
            arrays.update({f"prediction_{i}": pred, f"label_{i}": label, f"time_{i}": t})
        Path(series).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(series, **arrays)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return result


def offline_table(result: dict) -> str:
    keys = ("rmse", "mae", "speed_weighted_mae", "cumulative_speed_weighted_error", "qce", "tre")
    lines = [f"{result['policy']} on {result['data']} ({result['episodes']} episodes, "
             f"{result['model']['frames']} frames)", f"  {'metric':<32} {'model':>9} {'all-zeros':>10}"]
    for key in keys:
        lines.append(f"  {key:<32} {result['model'][key]:>9.4f} {result['zeros'][key]:>10.4f}")
    return "\n".join(lines)
