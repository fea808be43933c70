"""Short closed-loop rollouts from logged states: the middle ground between offline and closed loop.

Offline metrics score a policy on the expert's states; the full closed loop lets its own
errors compound over whole routes. A *short loop* (NAVSIM's pseudo-simulation, Dauner et al.,
NeurIPS 2024) sits between: the car is put back into K states sampled from the held-out logs
(route position, lateral offset, heading error, speed and steering state), a recurrent policy
is first warmed up on the logged frames that led there, and then the policy drives for H
seconds on its own. Each rollout is scored by

- ``final_abs_offset_m``: |lateral offset| at the end of the horizon [m] (at the moment it
  left the road if it did);
- ``departed``: whether |offset| exceeded the departure threshold within the horizon;
- ``on_policy_rmse``: RMSE between the policy's commands and the expert's labels on the
  states the policy visited.

It costs K x (warm-up + H) steps: 16 rollouts of 3 s are 960 driven steps, against about
16,000 for the 20-route ``test`` suite. Sampling is fixed by ``seed``; every rollout resets
the simulator and the policy, so the results are identical for any number of workers.

The reset reproduces the logged state exactly (tested: lateral offset within 1 cm and
heading error within 0.1 deg); what differs from the logged run is what the state does not
hold: the suspension's transient and the cruise controller's integral.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from steerloop.agents.protocol import Policy, PolicyError, checked_predict, policy_capabilities
from steerloop.agents.spec import PolicyRef
from steerloop.driving_log import DrivingLog
from steerloop.errors import SteerloopError
from steerloop.evaluation.stats import bootstrap_ci
from steerloop.parallel import run_tasks
from steerloop.sim.env import LaneKeepConfig

HORIZON_S = 3.0  # [s] default rollout length
WARMUP_S = 1.0  # [s] default logged frames fed to the policy before it takes over
ROLLOUTS = 16  # default K
SEED = 0  # default sampling seed
MAX_RESET_OFFSET_ERROR_M = 0.01  # [m] a logged state is reproduced within this (else the log and world disagree)
MAX_RESET_HEADING_ERROR_RAD = math.radians(0.1)


class ShortLoopError(SteerloopError):
    """Bad short-loop settings (horizon, warm-up, K) or a log that cannot be restarted from."""


@dataclass(frozen=True)
class ShortLoopConfig:
    """Short closed-loop rollouts from logged states (``steerloop offline --rollouts K``)."""

    rollouts: int = ROLLOUTS
    """K: logged states to restart from (0 = none)."""
    horizon: float = HORIZON_S
    """H [s]: how long the policy drives from each state."""
    warmup: float = WARMUP_S
    """[s] logged frames fed to the policy (its recurrent state) before it takes over."""
    seed: int = SEED
    """Seeds the choice of the K states."""

    def check(self) -> None:
        if not (isinstance(self.rollouts, int) and self.rollouts >= 0):
            raise ShortLoopError(f"rollouts must be a whole number >= 0, got {self.rollouts!r}")
        if not (math.isfinite(self.horizon) and self.horizon > 0):
            raise ShortLoopError(f"horizon must be > 0 s, got {self.horizon}")
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            raise ShortLoopError(f"warmup must be >= 0 s, got {self.warmup}")


def logged_start(data: dict, t: int) -> dict:
    """The reset options that put the car into the logged state at step ``t`` of an episode
    (or window) read with :meth:`DrivingLog.read_episode` (the command pending in the steering delay line
    is the one executed at step ``t - 1``; the episode clock is the logged ``time``, so moving
    cars are where they were)."""
    return {"start_s": float(data["progress"][t]), "start_offset": float(data["lateral_offset"][t]),
            "start_heading": float(data["heading_error"][t]), "start_speed": float(data["speed"][t]),
            "start_wheel_angle": float(data["wheel_angle"][t]),
            "start_command": float(data["steering"][t - 1]) if t > 0 else None,
            "start_time": float(data["time"][t])}  # the clock of the moving cars (sim.traffic)


def _steps(seconds: float, dt: float) -> int:
    return int(round(seconds / dt))


def sample_states(log: DrivingLog, cfg: ShortLoopConfig, dt: float) -> list[tuple[int, int]]:
    """K (episode, step) pairs, sorted, drawn without replacement with ``cfg.seed`` from the
    steps that have ``warmup`` logged frames before them and ``horizon`` logged steps after,
    and where the logged car was on the road (a learner's DAgger log may leave it)."""
    horizon, warmup = _steps(cfg.horizon, dt), _steps(cfg.warmup, dt)
    lengths = {index: log.episode_length(index) for index in log.episodes}
    longest = max(lengths.values()) * dt
    if horizon + warmup >= max(lengths.values()):
        raise ShortLoopError(f"horizon {cfg.horizon} s plus warmup {cfg.warmup} s is longer than the episodes of "
                             f"{log.path} (longest {longest:.1f} s); give a shorter --horizon")
    limit = LaneKeepConfig.offroad_threshold
    candidates = []
    for index, n in lengths.items():
        offset = np.abs(log.read_episode(index, cameras=[])["lateral_offset"])
        candidates += [(index, t) for t in range(warmup, n - horizon) if offset[t] <= limit]  # on the road
    if cfg.rollouts > len(candidates):
        raise ShortLoopError(f"rollouts={cfg.rollouts} is more than the {len(candidates)} logged states of {log.path} "
                             f"that have {cfg.warmup} s before and {cfg.horizon} s after them; give --rollouts "
                             f"<= {len(candidates)}")
    rng = np.random.default_rng(cfg.seed)
    chosen = rng.choice(len(candidates), size=cfg.rollouts, replace=False)
    return sorted(candidates[i] for i in chosen)


def env_for_log(log: DrivingLog):
    """A simulator configured as the log's recording was (resolution, speed, expert, routes)."""
    from steerloop.sim.env import LaneKeepEnv

    from steerloop.sim.conditions import content_from_values

    config = log.manifest.get("config", {})
    kwargs = {key: config[key] for key in ("speed", "expert", "track_length") if key in config}
    if config.get("condition_file"):  # recorded under a user's condition file: rebuilt from the manifest's values
        kwargs["condition_file"] = content_from_values(config["condition_file"]["values"])
    if "control_hz" in config:
        kwargs["control_hz"] = int(config["control_hz"])
    return LaneKeepEnv(resolution=tuple(log.resolution), **kwargs)


def _episode_start(log: DrivingLog, index: int) -> dict:
    attrs = log.episode_attrs(index)
    if "track_spec" not in attrs:
        raise ShortLoopError(f"episode {index} of {log.path} has no track_spec attribute, so the car cannot be put "
                             "back on its road; short rollouts need logs written by `steerloop record`")
    spec = attrs["track_spec"]
    return {"track": json.loads(spec) if isinstance(spec, str) else spec, "condition": str(attrs["condition"]),
            "seed": int(attrs["seed"])}


def rollout_from(policy: Policy, env, log: DrivingLog, index: int, t: int, cfg: ShortLoopConfig, *,
                 name: str, camera: str = "center") -> dict:
    """One short rollout: reset to the logged state (episode ``index``, step ``t``), warm the
    policy up on the logged frames before it, then let it drive ``cfg.horizon`` seconds."""
    warmup = _steps(cfg.warmup, env.dt)
    first = max(t - warmup - 1, 0)  # the warm-up frames, and step t - 1's command for the delay line
    data = log.read_window(index, first, t - first + 1, cameras=[camera])  # only what the rollout uses
    frames, speed, at = data[f"frames/{camera}"], data["speed"], t - first
    episode = _episode_start(log, index)
    where = [f"episode {index} step {t} of {log.path}"]
    obs, info = env.reset(seed=episode["seed"], options={"track": episode["track"], "condition": episode["condition"],
                                                          **logged_start(data, at)})
    reset_error = (abs(info["lateral_offset"] - float(data["lateral_offset"][at])),
                   abs(info["heading_error"] - float(data["heading_error"][at])))
    policy.reset()
    state, start = None, True
    for tau in range(at - warmup, at):
        batch = {"image": frames[tau][None], "speed": np.array([[speed[tau]]], np.float32)}
        _, state = checked_predict(policy, batch, state, np.array([start]), name=name, where=where)
        start = False
    errors, departed, final = [], False, 0.0
    for _ in range(_steps(cfg.horizon, env.dt)):
        batch = {key: value[None] for key, value in obs.items()}
        action, state = checked_predict(policy, batch, state, np.array([start]), name=name, where=where)
        start = False
        errors.append(float(action[0, 0]) - info["expert_steering"])
        obs, _, terminated, _, info = env.step(action[0])
        departed |= bool(info["departure"])
        final = abs(info["lateral_offset"])
        if terminated:  # off the road (the sampled states leave room for the horizon before the route's end)
            break
    return {"episode": index, "step": t, "final_abs_offset_m": final, "departed": departed,
            "on_policy_rmse": float(np.sqrt(np.mean(np.square(errors)))), "steps": len(errors),
            "off_road": bool(info["off_road"]), "reset_offset_error_m": reset_error[0],
            "reset_heading_error_rad": reset_error[1], "_errors": errors}


# ----------------------------------------------------------------------------- workers
_WORKER: dict = {}


def _worker_init(ref: PolicyRef, data: str) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.clear()
    _WORKER.update(policy=ref.load(), name=ref.name, log=DrivingLog(data))
    _WORKER["env"] = env_for_log(_WORKER["log"])


def _worker_run(job: int, index: int, t: int, cfg: ShortLoopConfig) -> tuple[int, dict]:
    w = _WORKER
    return job, rollout_from(w["policy"], w["env"], w["log"], index, t, cfg, name=w["name"])


def short_loop(ref: PolicyRef, data: str, cfg: ShortLoopConfig, *, workers: int = 1, backend: str = "local",
               address: str | None = None, progress: bool = False) -> dict | None:
    """K short rollouts of the policy ``ref`` from states of the log ``data``; the aggregate
    (means with 95% bootstrap intervals over rollouts) and every rollout. None for K = 0."""
    cfg.check()
    if cfg.rollouts == 0:
        return None
    from tqdm import tqdm

    policy = ref.load()
    if policy_capabilities(policy).requires_privileged:
        raise PolicyError(f"policy {ref.name!r}: short rollouts from logs need a camera policy")
    with DrivingLog(data) as log:
        dt = 1.0 / float(log.manifest.get("config", {}).get("control_hz", 20))
        states = sample_states(log, cfg, dt)
        for index in sorted({index for index, _ in states}):
            _episode_start(log, index)  # every chosen episode can be restarted: fail before any rollout
    if workers > 1 or backend == "ray":
        ref.for_workers()
    results: dict[int, dict] = {}
    bar = tqdm(total=len(states), unit="rollout", desc=f"short loop {cfg.horizon:g} s", disable=not progress,
               dynamic_ncols=True)

    def keep(result) -> None:
        job, rollout = result
        results[job] = rollout
        bar.update(1)

    jobs = [(job, index, t, cfg) for job, (index, t) in enumerate(states)]
    try:
        run_tasks(_worker_run, jobs, keep, workers=workers, backend=backend, address=address,
                  initializer=_worker_init, initargs=(ref, data))
    finally:
        bar.close()
        if "env" in _WORKER:
            _WORKER["env"].close()
        _WORKER.clear()
    rollouts = [results[job] for job in range(len(states))]
    return summarize(rollouts, cfg)


def summarize(rollouts: list[dict], cfg: ShortLoopConfig) -> dict:
    """Means over rollouts with 95% bootstrap intervals; the on-policy RMSE pools every step."""
    errors = np.concatenate([np.asarray(r.pop("_errors"), np.float64) for r in rollouts])
    out = {"rollouts": len(rollouts), "horizon_s": cfg.horizon, "warmup_s": cfg.warmup, "seed": cfg.seed,
           "steps": int(sum(r["steps"] for r in rollouts)),
           "on_policy_rmse": float(np.sqrt(np.mean(np.square(errors)))),
           "max_reset_offset_error_m": max(r["reset_offset_error_m"] for r in rollouts),
           "max_reset_heading_error_rad": max(r["reset_heading_error_rad"] for r in rollouts)}
    for key, values in (("final_abs_offset_m", [r["final_abs_offset_m"] for r in rollouts]),
                        ("departure_rate", [float(r["departed"]) for r in rollouts])):
        out[key], lo, hi = bootstrap_ci(values)
        out[f"{key}_ci95"] = [lo, hi]
    out["per_rollout"] = rollouts
    return out
