"""The closed-loop runner (``steerloop evaluate``): any policy over a scenario suite.

Each scenario runs in a worker process with its own simulator and its own copy of the
policy; per-scenario results are written as soon as they finish (an interrupted run
resumes), and everything is assembled in scenario order, so results are bit-identical
for any number of workers.

Output directory:
- ``results.json``: schema-versioned results (policy, suite, seeds, versions,
  per-scenario metrics, aggregates with 95% bootstrap intervals);
- ``scenarios/<name>.json`` and ``trajectories/<name>.npz``: per-scenario metrics and
  per-step trajectories (load with ``np.load(path)``; no pickle);
- ``plots/<name>.png``: top-down trajectory and lateral offset over time per scenario;
- ``videos/<name>.mp4`` for the first N scenarios with ``--video N``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from gymnasium.wrappers import TimeLimit

from steerloop.agents.protocol import Policy, PolicyError, describe_policy, policy_capabilities
from steerloop.agents.spec import PolicyRef, policy_ref
from steerloop.errors import SteerloopError
from steerloop.files import atomic_write_json, json_safe, software_versions
from steerloop.evaluation.metrics import autonomy_percent, recovery_metrics
from steerloop.evaluation.stats import bootstrap_ci
from steerloop.evaluation.rollout import rollout_batch
from steerloop.evaluation.suites import Scenario, Suite, check_scenario_names
from steerloop.sim import MAX_EPISODE_STEPS
from steerloop.sim.conditions import ConditionFile
from steerloop.sim.env import LaneKeepEnv
from steerloop.parallel import check_backend, connect_ray, run_tasks
from steerloop.paths import path_under
from steerloop.sim.wrappers import InterventionWrapper, PerturbationWrapper

RESULTS_SCHEMA_VERSION = "1.0.0"
DEFAULT_BATCH = 4  # at most this many scenarios per lockstep group (batched inference; see lockstep_groups)
AGGREGATE_KEYS = ("success", "mean_abs_offset_m", "max_abs_offset_m", "rms_heading_error_rad", "departures_per_km",
                  "time_outside_lane_s", "route_completion", "on_policy_rmse", "smoothness_per_s")


_ENV_POOL: dict[tuple, list[LaneKeepEnv]] = {}


def _pooled_env(scenario: Scenario, slot: int, privileged: bool, resolution,
                condition_file: ConditionFile | None = None) -> LaneKeepEnv:
    """The ``slot``-th simulator of this process for the scenario's settings. Simulators are
    reused across scenarios (track and condition come through ``reset``): the car is
    reloaded at every reset, so a reused simulator gives the same results as a new one.
    A suite's condition file reaches the simulator as its content (never re-read here)."""
    key = (scenario.speed, scenario.track_length, tuple(resolution), privileged,
           condition_file.sha256 if condition_file is not None else None)
    pool = _ENV_POOL.setdefault(key, [])
    extra = {"condition_file": dict(condition_file.content)} if condition_file is not None else {}
    while len(pool) <= slot:
        pool.append(LaneKeepEnv(speed=scenario.speed, track_length=scenario.track_length,
                                resolution=tuple(resolution), privileged=privileged, **extra))
    return pool[slot]


def close_env_pool() -> None:
    for pool in _ENV_POOL.values():
        for env in pool:
            env.close()
    _ENV_POOL.clear()


def make_env(scenario: Scenario, *, privileged: bool, resolution=(66, 200), slot: int = 0,
             condition_file: ConditionFile | None = None):
    """The scenario's environment: a pooled LaneKeep simulator + perturbations /
    interventions + TimeLimit. Reset it with :func:`reset_options` of the scenario.
    ``condition_file`` is its suite's (``Suite.condition_file``)."""
    env = _pooled_env(scenario, slot, privileged, resolution, condition_file)
    if scenario.perturbations:
        env = PerturbationWrapper(env, list(scenario.perturbations))
    if scenario.interventions:
        env = InterventionWrapper(env)
    return TimeLimit(env, MAX_EPISODE_STEPS)


def reset_options(scenario: Scenario) -> dict:
    return {"track": scenario.track, "condition": scenario.condition}


def _scenario_metrics(scenario: Scenario, env, episode) -> dict:
    base = env.unwrapped
    metrics = dict(episode.metrics)
    metrics.update(off_road=episode.off_road, truncated=episode.truncated, track=episode.info["track"],
                   route_length_m=episode.info["route_length"])
    if scenario.perturbations:
        events = recovery_metrics(episode.trajectory, scenario.perturbations, dt=base.dt,
                                  departure_threshold=base.config.departure_threshold)
        metrics["recovery_events"] = events
        metrics["recovery_rate"] = sum(e["recovered"] for e in events) / len(events)
    if scenario.interventions:
        metrics["interventions"] = episode.interventions
        metrics["autonomy_pct"] = autonomy_percent(episode.interventions, metrics["duration_s"])
    return metrics


def lockstep_groups(n: int, batch: int) -> list[list[int]]:
    """Scenario indices 0..n-1 split, in order, into the groups that step in lockstep.

    The fewest groups of at most ``batch`` scenarios, made an even number when there are
    enough scenarios, with sizes differing by at most one: groups are the unit of parallel
    work, so two workers (or any number dividing the count) always get equal shares. The
    20-scenario suites become groups of 4, 4, 3, 3, 3, 3 (5 groups of 4 would leave one
    worker 3 and the other 2). Depends on ``n`` and ``batch`` only, never on the workers.
    """
    if n < 1:
        return []
    count = math.ceil(n / batch)
    if count % 2 and count < n:
        count += 1
    size, larger = divmod(n, count)
    groups, start = [], 0
    for g in range(count):
        end = start + size + (g < larger)
        groups.append(list(range(start, end)))
        start = end
    return groups


def run_group(policy: Policy, scenarios: list[Scenario], *, resolution=(66, 200), videos=None,
              name: str | None = None, condition_file: ConditionFile | None = None) -> list[tuple[dict, dict]]:
    """Drive ``policy`` through ``scenarios`` in lockstep (batched inference); returns
    (metrics, trajectory) per scenario. ``name`` names the policy in errors; ``condition_file``
    is the scenarios' suite's."""
    privileged = policy_capabilities(policy).requires_privileged
    envs = [make_env(scenario, privileged=privileged, resolution=resolution, slot=slot,
                     condition_file=condition_file)
            for slot, scenario in enumerate(scenarios)]
    episodes = rollout_batch(envs, policy, seeds=[s.seed for s in scenarios],
                             options=[reset_options(s) for s in scenarios], videos=videos,
                             names=[s.name for s in scenarios], policy_name=name)
    return [(_scenario_metrics(s, env, ep), ep.trajectory) for s, env, ep in zip(scenarios, envs, episodes)]


def run_scenario(policy: Policy, scenario: Scenario, *, resolution=(66, 200), video: str | None = None,
                 name: str | None = None, condition_file: ConditionFile | None = None):
    """Drive ``policy`` through one ``scenario``; returns (metrics dict, trajectory dict)."""
    return run_group(policy, [scenario], resolution=resolution, videos=[video], name=name,
                     condition_file=condition_file)[0]


# ----------------------------------------------------------------------------- workers
_POLICY = {}


def _single_threaded() -> None:
    """One thread per worker process for torch and OpenCV (processes give the parallelism)."""
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _worker_init(ref: PolicyRef) -> None:
    """Re-create the policy from its spec (or receive the pickled object) in this worker."""
    _single_threaded()
    _POLICY["policy"], _POLICY["name"] = ref.load(), ref.name


def _worker_run(indices: list[int], scenarios: list[Scenario], resolution, videos,
                condition_file: ConditionFile | None = None):
    results = run_group(_POLICY["policy"], scenarios, resolution=resolution, videos=videos, name=_POLICY["name"],
                        condition_file=condition_file)
    return [(i, metrics, trajectory) for i, (metrics, trajectory) in zip(indices, results)]


def aggregate(scenario_metrics: list[dict], suite: Suite) -> dict:
    """Means over scenarios with 95% bootstrap intervals (seeded, deterministic)."""
    out = {}
    for key in AGGREGATE_KEYS:
        values = [float(m[key]) if m.get(key) is not None else None for m in scenario_metrics]
        point, lo, hi = bootstrap_ci(values)
        name = "success_rate" if key == "success" else key
        out[name] = point
        out[f"{name}_ci95"] = [lo, hi]
    if suite.has_perturbations:
        events = [e for m in scenario_metrics for e in m.get("recovery_events", [])]
        recovered = [float(e["recovered"]) for e in events]
        out["recovery_rate"], lo, hi = bootstrap_ci(recovered) if recovered else (None, None, None)
        out["recovery_rate_ci95"] = [lo, hi]
        times = [e["recovery_time_s"] for e in events if e["recovery_time_s"] is not None]
        out["median_recovery_time_s"] = float(np.median(times)) if times else None
        overshoot = [e["overshoot_m"] for e in events if e["overshoot_m"] is not None]
        out["mean_overshoot_m"] = float(np.mean(overshoot)) if overshoot else None
        out["perturbations"] = len(events)
    if suite.has_interventions:
        values = [m.get("autonomy_pct") for m in scenario_metrics]
        out["autonomy_pct"], lo, hi = bootstrap_ci(values)
        out["autonomy_pct_ci95"] = [lo, hi]
        out["interventions"] = int(sum(m.get("interventions", 0) for m in scenario_metrics))
    out["scenarios"] = len(scenario_metrics)
    return out


class ResultsError(SteerloopError):
    """The output directory holds a different run, or results cannot be compared."""


def _discard(out: Path, created: bool, written: list[Path]) -> None:
    """Undo what a failed run wrote: the whole directory if this run created it, else its files."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for path in written:
        path.unlink(missing_ok=True)


def _check_condition_file_unchanged(previous: dict, suite: Suite, out: Path) -> None:
    """Refuse to resume ``out`` when the suite's condition file now has other content, naming the file."""
    recorded = (previous.get("suite") or {}).get("condition_file") if isinstance(previous, dict) else None
    source = suite.condition_file
    if source is not None and isinstance(recorded, dict) and recorded.get("sha256") != source.sha256:
        raise ResultsError(f"condition file {source.path}: its content (sha256 {source.sha256[:12]}) is not what "
                           f"{out} was evaluated with (sha256 {str(recorded.get('sha256'))[:12]}); restore that file "
                           "to resume, or choose another --out (nothing was overwritten)")


def evaluate(policy: str | Policy, suite: Suite, out: str | Path, *, policy_kwargs: dict | None = None,
             name: str | None = None, workers: int = 1, videos: int = 0, resolution=(66, 200), progress: bool = True,
             plots: bool = True, batch: int = DEFAULT_BATCH, backend: str = "local",
             address: str | None = None) -> dict:
    """Run ``policy`` over ``suite`` into ``out``; returns the results dict.

    ``policy`` is a policy spec (a built-in name, a checkpoint directory, a ``.zip``,
    ``package.module:attr`` or ``path/to/file.py:attr``; a user's class or factory gets
    ``policy_kwargs``) or any object satisfying :class:`~steerloop.agents.protocol.Policy`.
    Worker processes re-create a spec; an object is pickled to them, and one that cannot be
    fails at once (name it by its spec instead). ``name`` is what the results call the
    policy (default: the spec, or the object's class name); results are bit-identical for a
    spec and the object it names. A policy that fails (raises, or returns a wrong shape,
    dtype or NaN) raises a one-line :class:`~steerloop.agents.protocol.PolicyError`, and
    this run's files are removed from ``out``.

    Scenarios run in fixed groups of at most ``batch`` (:func:`lockstep_groups`) that step
    in lockstep with one batched ``predict`` per step; groups are spread over ``workers``
    processes. Group composition never depends on ``workers``, so results are
    bit-identical for any number of workers.

    ``backend`` chooses where groups run: ``local`` (worker processes on this machine) or
    ``ray`` (one Ray task per group, on the cluster at ``address``, "auto" or "HOST:PORT",
    or on a new local Ray instance when ``address`` is None); results are identical. With
    Ray the policy path must be readable from every node.
    """
    from tqdm import tqdm

    out = Path(out)
    check_scenario_names(suite, f"suite {suite.name!r}")  # each names result files: refuse before any work
    check_backend(backend, address)
    ref = policy_ref(policy, policy_kwargs, name)
    policy = ref.load()  # fail fast on a bad policy, before any work
    if backend == "ray" or workers > 1:
        ref.for_workers()  # an object that cannot reach worker processes fails here, naming the spec form
    describe = describe_policy(policy, ref.name)
    if backend == "ray":
        connect_ray(address, num_cpus=max(workers, 1))  # an unreachable cluster also fails before any work
    trained_on = policy_capabilities(policy).image_size
    if trained_on is not None and tuple(trained_on) != tuple(resolution):
        raise ValueError(f"{ref.name} was trained on {trained_on[0]}x{trained_on[1]} camera images; evaluate it "
                         f"with --resolution {trained_on[0]}x{trained_on[1]} (got {resolution[0]}x{resolution[1]})")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    run_id = {"policy": ref.name, "suite": suite.to_dict(), "resolution": list(resolution), "batch": batch}
    if ref.kwargs:
        run_id["policy_kwargs"] = ref.kwargs
    run_file = path_under(out, "run.json")
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        _check_condition_file_unchanged(previous, suite, out)
        if previous != json_safe(run_id):
            raise ResultsError(f"{out} already holds results of a different run (see {run_file}); "
                               "choose another --out, nothing was overwritten")
    elif (out / "results.json").exists():
        raise ResultsError(f"{out} holds results.json from another run; choose another --out")
    created, written = not out.exists(), []  # what a failing policy's run removes again
    if not run_file.exists():
        written.append(run_file)
    subdirs = [path_under(out, sub) for sub in ("scenarios", "trajectories", "videos")]  # before any write
    for subdir in subdirs:
        subdir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(json_safe(run_id), indent=1, sort_keys=True))

    done = {}
    for i, scenario in enumerate(suite.scenarios):
        path = path_under(out, "scenarios", f"{scenario.name}.json")
        if path.exists() and path_under(out, "trajectories", f"{scenario.name}.npz").exists():
            done[i] = json.loads(path.read_text())["metrics"]
    todo = [i for i in range(len(suite.scenarios)) if i not in done]
    bar = tqdm(total=len(suite.scenarios), initial=len(done), unit="scenario", desc=f"evaluate {suite.name}",
               disable=not progress, dynamic_ncols=True)
    steps, started = 0, time.perf_counter()

    def save(index: int, metrics: dict, trajectory: dict) -> None:
        nonlocal steps
        scenario = suite.scenarios[index]
        written.extend([path_under(out, "trajectories", f"{scenario.name}.npz"),
                        path_under(out, "scenarios", f"{scenario.name}.json")])
        np.savez_compressed(path_under(out, "trajectories", f"{scenario.name}.npz"), **trajectory)
        record = {"scenario": scenario.to_dict(), "metrics": json_safe(metrics)}
        atomic_write_json(path_under(out, "scenarios", f"{scenario.name}.json"), record)
        done[index] = record["metrics"]
        steps += metrics["steps"]
        bar.set_postfix(steps_per_s=f"{steps / (time.perf_counter() - started):.0f}")
        bar.update(1)

    def video_for(index: int):
        if index >= videos:
            return None
        written.append(path_under(out, "videos", f"{suite.scenarios[index].name}.mp4"))
        return str(written[-1])

    # A group is re-run whole, so resumes match.
    groups = [g for g in lockstep_groups(len(suite.scenarios), batch) if any(i in todo for i in g)]

    def save_group(results) -> None:
        for index, metrics, trajectory in results:
            if index in todo:
                save(index, metrics, trajectory)

    jobs = [(g, [suite.scenarios[i] for i in g], tuple(resolution), [video_for(i) for i in g], suite.condition_file)
            for g in groups]
    try:
        if backend == "local" and (workers <= 1 or len(jobs) <= 1):
            _single_threaded()
            for indices, scenarios, res, video_paths, condition_file in jobs:
                results = run_group(policy, scenarios, resolution=res, videos=video_paths, name=ref.name,
                                    condition_file=condition_file)
                save_group([(i, m, t) for i, (m, t) in zip(indices, results)])
        else:
            run_tasks(_worker_run, jobs, save_group, workers=max(workers, 1), backend=backend, address=address,
                      initializer=_worker_init, initargs=(ref,))
    except PolicyError:
        _discard(out, created, written)
        raise
    finally:
        bar.close()
        close_env_pool()

    scenario_metrics = [done[i] for i in range(len(suite.scenarios))]
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "policy": {"name": ref.name, **json_safe(describe)},
        "suite": suite.name,
        "seeds": [s.seed for s in suite.scenarios],
        "resolution": list(resolution),
        "batch": batch,
        "software": software_versions(),
        "scenarios": [{"name": s.name, "track": s.track if isinstance(s.track, int) else s.track.get("name"),
                       "condition": s.condition, "seed": s.seed, "metrics": m}
                      for s, m in zip(suite.scenarios, scenario_metrics)],
        "aggregate": aggregate(scenario_metrics, suite),
    }
    if suite.condition_file is not None:  # the conditions' source (its content is in run.json)
        results["condition_file"] = {"path": suite.condition_file.path, "sha256": suite.condition_file.sha256}
    tmp = path_under(out, "results.json.tmp")
    tmp.write_text(json.dumps(json_safe(results), indent=1, sort_keys=True))
    os.replace(tmp, path_under(out, "results.json"))
    if plots:
        from steerloop.evaluation.plots import plot_results

        plot_results(out, results, suite)
    return results


def summary_table(results: dict) -> str:
    """The printed summary: success, mean |offset|, departures/km, autonomy, recovery, on-policy RMSE."""
    agg = results["aggregate"]

    def fmt(key, scale=1.0, digits=3):
        value = agg.get(key)
        if value is None:
            return "-"
        ci = agg.get(f"{key}_ci95") or [None, None]
        text = f"{value * scale:.{digits}f}"
        if ci[0] is not None:
            text += f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"
        return text

    rows = [("success rate", fmt("success_rate", 100, 1) + " %"), ("mean |offset| [m]", fmt("mean_abs_offset_m")),
            ("departures / km", fmt("departures_per_km", 1, 2)), ("autonomy [%]", fmt("autonomy_pct", 1, 1)),
            ("recovery rate", fmt("recovery_rate", 100, 1) + (" %" if agg.get("recovery_rate") is not None else "")),
            ("on-policy RMSE", fmt("on_policy_rmse", 1, 4))]
    width = max(len(r[0]) for r in rows)
    head = f"{results['policy']['name']} on {results['suite']} ({agg['scenarios']} scenarios, 95% CI)"
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])
