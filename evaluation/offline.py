"""Offline metrics on held-out driving logs (``steerloop offline``), as defined in docs/metrics.md.

The policy is replayed open loop along each logged episode: it sees the logged frames
one step at a time, its recurrent state carried across the episode, and its predictions
are compared with the expert labels. Every metric is reported beside the all-zeros
predictor's value and the "repeat the previous command" predictor's (the copycat's free
offline score). Metrics pool all frames of all episodes; windowed metrics never cross
an episode boundary. The RMSE is also split by event: at the expert's steering
change-points and on steady segments (evaluation.copycat).

A model with fed-back inputs is replayed twice: free running (its own previous outputs
fed back, as in closed loop: the ``model`` entry) and teacher forced (the logged executed
command, speed and throttle of the step before: ``teacher_forced``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from steerloop.agents.protocol import Policy, PolicyError, checked_predict, policy_capabilities
from steerloop.driving_log import DrivingLog, LogError
from steerloop.evaluation.copycat import CHANGE_MARGIN, change_points, event_errors, repeat_previous
from steerloop.evaluation.short_loop import ShortLoopConfig, short_loop
from steerloop.files import atomic_write_json
from steerloop.training.copycat import copycat_probe

WINDOW = 16  # [steps] window of the cumulative speed-weighted error
TRE_FRACTION = 0.1  # thresholded relative error: |a - a_hat| > 0.1 |a|
CHUNK = 128  # [frames] preprocessed at once in the teacher-forced replay
BALANCE_EDGES = (0.01, 0.03, 0.1, 0.3)  # bins of expert |steering| (normalised) for the balanced MAE


def balanced_mae(a_hat: np.ndarray, a: np.ndarray) -> tuple[float, list[dict]]:
    """MAE averaged over bins of the expert's |steering| (edges BALANCE_EDGES), so the many
    near-straight frames do not drown the few large commands; empty bins are left out.
    Returns (balanced MAE, per bin {"low", "high", "frames", "mae"})."""
    err, magnitude = np.abs(a_hat - a), np.abs(a)
    index = np.digitize(magnitude, BALANCE_EDGES)
    bounds = (0.0, *BALANCE_EDGES, 1.0)
    bins = [{"low": bounds[i], "high": bounds[i + 1], "frames": int(np.sum(index == i)),
             "mae": float(np.mean(err[index == i])) if np.any(index == i) else None} for i in range(len(bounds) - 1)]
    return float(np.mean([b["mae"] for b in bins if b["mae"] is not None])), bins


def offline_metrics(predictions: list[np.ndarray], labels: list[np.ndarray], speeds: list[np.ndarray],
                    dt: float) -> dict:
    """RMSE, MAE, MAE balanced over steering-magnitude bins, speed-weighted MAE, cumulative
    speed-weighted error, QCE and TRE.

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
        "balanced_mae": balanced_mae(a_hat, a)[0],
        "speed_weighted_mae": float(np.mean(np.abs(err) * np.abs(v))),
        "cumulative_speed_weighted_error": float(np.mean(cumulative)) if cumulative else None,
        "qce": float(np.mean(bins(a_hat) != bins(a))),
        "tre": float(np.mean(np.abs(err) > TRE_FRACTION * np.abs(a))),
        "frames": int(len(a)),
    }


def replay(policy: Policy, log: DrivingLog, index: int, camera: str = "center", name: str | None = None) -> np.ndarray:
    """The policy's predictions along logged episode ``index``, step by step (a batch of one
    observation per step), state carried. ``name`` names the policy in errors."""
    name = name or type(policy).__qualname__
    if policy_capabilities(policy).requires_privileged:
        raise PolicyError(f"policy {name!r}: offline replay needs a camera policy; a privileged policy (such as "
                          "the expert) cannot be replayed from logs")
    data = log.read_episode(index, cameras=[camera])
    frames, speed = data[f"frames/{camera}"], data["speed"]
    where = [f"episode {index} of {log.path}"]
    out = np.empty(len(frames), dtype=np.float32)
    state = None
    policy.reset()
    for t in range(len(frames)):
        obs = {"image": frames[t][None], "speed": np.array([[speed[t]]], np.float32)}  # a batch of one
        action, state = checked_predict(policy, obs, state, np.array([t == 0]), name=name, where=where)
        out[t] = action[0, 0]
    return out


def replay_teacher_forced(policy, log: DrivingLog, index: int, camera: str = "center") -> np.ndarray:
    """A fed-back model's predictions along logged episode ``index`` with the logged values of
    the step before in its loop (teacher forcing), state carried, in chunks of CHUNK frames."""
    import torch

    from steerloop.agents.preprocess import preprocess

    model = policy.model
    data = log.read_episode(index, cameras=[camera])
    frames = data[f"frames/{camera}"]
    logged = {f"prev_{name}": torch.from_numpy(repeat_previous(data[name]))[None]
              for name in ("steering", "speed", "throttle")}  # (1, N) each; steering = the executed command
    teacher = model.teacher_inputs(logged)  # (1, N, F)
    speed = torch.from_numpy(np.asarray(data["speed"], np.float32))[None]  # (1, N)
    out, state = [], None
    with torch.inference_mode():
        for start in range(0, len(frames), CHUNK):
            window = slice(start, start + CHUNK)
            x = torch.from_numpy(preprocess(frames[window], policy.config.preprocess))[None]  # (1, n, 3, h, w)
            steering, state = model.predict_sequence(x, state, speed=speed[:, window] if model.sensors else None,
                                                     teacher=teacher[:, window])
            out.append(steering[0].numpy())
    return np.clip(np.concatenate(out), -1.0, 1.0).astype(np.float32)


def evaluate_offline(policy: str | Policy, data: str, out: str | None = None, dt: float | None = None,
                     series: str | None = None, *, policy_kwargs: dict | None = None, name: str | None = None,
                     short: ShortLoopConfig | None = None, workers: int = 1, backend: str = "local",
                     address: str | None = None, progress: bool = False) -> dict:
    """Offline metrics of ``policy`` (a policy spec, with ``policy_kwargs`` for a user's class
    or factory, or a policy object) on every episode of ``data``, beside all-zeros. ``name``
    is what the result calls the policy (default: the spec or the class name).

    ``short``: also drive short closed-loop rollouts from states of the logs
    (:mod:`steerloop.evaluation.short_loop`; ``result["short_loop"]``), spread over
    ``workers`` processes or Ray (``backend``/``address``) with identical results.

    ``series``: also save the open-loop replay as an ``.npz`` holding, per episode ``i``,
    ``prediction_i``, ``label_i`` and ``time_i`` ((N_i,) arrays; load with ``np.load``)."""
    import torch

    from steerloop.agents.policy import LearnedPolicy
    from steerloop.agents.spec import policy_ref

    ref = policy_ref(policy, policy_kwargs, name)
    if short is not None:
        short.check()  # bad settings fail before any work
    policy = ref.load()
    log = DrivingLog(data, verify=True)  # a corrupted label would silently skew every metric
    if not log.episodes:
        log.close()
        raise LogError(f"{data} holds no episodes: record some with `steerloop record --out {data}` first")
    if dt is None:
        dt = 1.0 / float(log.manifest.get("config", {}).get("control_hz", 20))
    predictions, labels, speeds, times, executed, per_episode = [], [], [], [], [], []
    fed_back = tuple(policy.model.feedback) if isinstance(policy, LearnedPolicy) else ()  # replayed teacher forced too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one frame at a time: more threads only spin (20x slower on a busy machine)
    try:
        preds = [replay(policy, log, index, name=ref.name) for index in log.episodes]
        forced = [replay_teacher_forced(policy, log, index) for index in log.episodes] if fed_back else None
    finally:
        torch.set_num_threads(threads)
    for index, pred in zip(log.episodes, preds):
        episode = log.read_episode(index, cameras=[])
        predictions.append(pred)
        labels.append(episode["expert_steering"])
        speeds.append(episode["speed"])
        times.append(episode["time"])
        executed.append(episode["steering"])
        per_episode.append({"episode": index, "rmse": float(np.sqrt(np.mean((pred - episode["expert_steering"]) ** 2)))})
    baselines = {"zeros": [np.zeros_like(p) for p in predictions], "repeat_previous": [repeat_previous(e)
                                                                                       for e in executed]}
    result = {
        "policy": ref.name, "data": str(data), "episodes": len(log.episodes), "fed_back": list(fed_back),
        "model": offline_metrics(predictions, labels, speeds, dt),
        **{name: offline_metrics(values, labels, speeds, dt) for name, values in baselines.items()},
        "per_episode": per_episode,
    }
    masks, threshold = change_points(labels)
    events = {"model": event_errors(predictions, labels, masks),
              **{name: event_errors(values, labels, masks) for name, values in baselines.items()}}
    if fed_back:
        result["teacher_forced"] = offline_metrics(forced, labels, speeds, dt)
        events["teacher_forced"] = event_errors(forced, labels, masks)
    result["events"] = {"change_threshold_per_s": threshold / dt, **events}
    result["copycat_probe"] = {"expert": copycat_probe(labels)}
    result["steering_bins"] = balanced_mae(np.concatenate(predictions), np.concatenate(labels))[1]
    log.close()
    if short is not None and short.rollouts > 0:
        result["short_loop"] = short_loop(ref, data, short, workers=workers, backend=backend, address=address,
                                          progress=progress)
    if series:
        arrays = {}
        for i, (pred, label, t) in enumerate(zip(predictions, labels, times)):
            arrays.update({f"prediction_{i}": pred, f"label_{i}": label, f"time_{i}": t})
            if fed_back:
                arrays[f"teacher_forced_{i}"] = forced[i]
        Path(series).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(series, **arrays)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
    return result


def _cell(value) -> str:
    return f"{value:>11.4f}" if value is not None else f"{'-':>11}"


def offline_table(result: dict) -> str:
    """The printed table: every metric for the model (free running and teacher forced for a
    fed-back model), all-zeros and repeat-previous; the RMSE split by event; the probe."""
    keys = ("rmse", "mae", "balanced_mae", "speed_weighted_mae", "cumulative_speed_weighted_error", "qce", "tre")
    columns = [("model", "model")] if "teacher_forced" not in result else [("model", "free-run"),
                                                                            ("teacher_forced", "teacher")]
    columns += [("zeros", "all-zeros"), ("repeat_previous", "repeat-prev")]
    columns = [(key, title) for key, title in columns if key in result]
    lines = [f"{result['policy']} on {result['data']} ({result['episodes']} episodes, "
             f"{result['model']['frames']} frames)", f"  {'metric':<32}" + "".join(f" {t:>11}" for _, t in columns)]
    for key in keys:
        lines.append(f"  {key:<32}" + "".join(f" {_cell(result[c][key])}" for c, _ in columns))
    events = result.get("events")
    if events:
        for key, title in (("change_point_rmse", "rmse at change-points"), ("steady_rmse", "rmse on steady segments")):
            lines.append(f"  {title:<32}" + "".join(f" {_cell(events[c][key])}" for c, _ in columns))
        lines.append(f"  ({events['model']['change_point_frames']} change-point frames: the expert's command changes "
                     f"faster than {events['change_threshold_per_s']:.3f}/s, +-{CHANGE_MARGIN} steps)")
    short = result.get("short_loop")
    if short:
        lines.append(f"  short closed loop: {short['rollouts']} rollouts of {short['horizon_s']:g} s from logged states "
                     f"(warm-up {short['warmup_s']:g} s, seed {short['seed']}, {short['steps']} steps)")
        for key, title in (("final_abs_offset_m", "|offset| at the end [m]"), ("departure_rate", "departure rate")):
            lo, hi = short[f"{key}_ci95"]
            lines.append(f"    {title:<30} {short[key]:.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"    {'on-policy RMSE':<30} {short['on_policy_rmse']:.4f}")
    probe = result.get("copycat_probe", {}).get("expert")
    if probe and probe.get("r2") is not None:
        lines.append(f"  copycat probe on the logged expert: the previous {probe['k']} commands explain "
                     f"R^2 = {probe['r2']:.4f} of the next (residual RMSE {probe['rmse']:.4f})")
    return "\n".join(lines)
