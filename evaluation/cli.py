"""The ``steerloop`` command line: one entry point composing sim, agents, training and evaluation.

Every option is a field of a config dataclass (the library's ``RecordConfig``,
``TrainConfig``, ``RLConfig``, ``DaggerConfig``, or one of the ``*Args`` classes below for
commands that are a single function call); :mod:`steerloop.evaluation.flags` turns the
fields into flags, so a field added to a config is a flag with no other edit.

Exit codes: 0 done; 1 a check failed (``validate``, ``regress``); 2 a user error (one line
on stderr naming the input and the fix); 130 interrupted (Ctrl-C) and 143 terminated
(SIGTERM), both with completed work kept.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steerloop.evaluation.flags import add_flags, config_from_args

EXIT_USAGE = 2  # a user error: bad flags, files or names
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): completed work is kept, re-running resumes
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM): the same clean stop as Ctrl-C
_TERMINATED: list[int] = []  # the SIGTERMs received by this process


# ------------------------------------------------------------------------------- flag checks
def _out_dir(text: str) -> str:
    """An output directory: not empty, not an existing file, not under a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    path = Path(text)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == path else f"is under {parent}, which is a file"
            raise argparse.ArgumentTypeError(f"{text} {where}; give a directory path")
    return text


def _out_file(text: str) -> str:
    """An output file: not empty, not a directory, not under a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a file, got an empty string")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name such as {path / 'offline.json'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is under {parent}, which is a file; give a path in a directory")
    return text


def _video_file(text: str) -> str:
    """A video file to write (MP4): not a directory, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name an .mp4 file, got an empty string")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name such as {Path(text) / 'drive.mp4'}")
    if Path(text).suffix.lower() != ".mp4":
        raise argparse.ArgumentTypeError(f"{text}: videos are written as MP4; give a name ending in .mp4")
    return text


POLICIES_HELP = """\
policies:
  Every command that takes a policy (drive, evaluate, offline, regress, record --learner, study
  files, the pytest fixture steerloop_evaluate) takes a policy spec:
    expert, expert:LAW, zeros      built-in drivers (LAW: stanley, pure_pursuit)
    DIR, MODEL.zip                 a steerloop checkpoint directory, a stable-baselines3 model
    package.module:attr            your own policy: an instance, a class or a factory of it
    path/to/file.py:attr           the same, from a file that is not an installed module
  A class or factory gets keyword arguments from --policy-kwargs '{"weights": "w.pt"}'.
  A policy implements steerloop.Policy: predict(observation, state=None, episode_start=None,
  deterministic=True) -> (actions (N, 1) float, state) on a batch of observations, and reset();
  optional: requires_privileged, initial_state(n), select_state(state, keep), describe(),
  image_size, cache_key(). A plain torch model is one line: steerloop.ModelPolicy(net,
  crop_top=20, resize=(66, 200), colour="yuv"). Your policy is trusted code: it runs in this
  process and in every worker. Cached results (regress, pytest, study) are keyed by its
  cache_key(), else by its module's source and the files its kwargs name; --no-cache re-runs.
  Guide and a tested example: docs/policies.md, examples/own_model/.

Exit codes: 0 done, 1 a check failed (validate, regress), 2 a user error, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). Every flag: docs/cli.md.
"""

OUT_DIR = {"type": _out_dir}
REQUIRED_OUT_DIR = {"type": _out_dir, "required": True}
AT_LEAST_ONE = {"min": 1}
AT_LEAST_ZERO = {"min": 0}
BACKENDS = {"choices": ("local", "ray")}


# ------------------------------------------------------------------- configs of single calls
@dataclass
class Progress:
    quiet: bool = False
    """No progress bars."""


@dataclass
class Backend:
    backend: str = field(default="local", metadata={"cli": BACKENDS})
    """Run episodes/scenarios in local worker processes or as Ray tasks (same results)."""
    address: str | None = None
    """With --backend ray: the Ray cluster, 'auto' or HOST:PORT (default: start a local Ray instance with
    --workers CPUs)."""


@dataclass
class DriveArgs:
    policy: str = "expert"
    """Policy spec: expert, expert:LAW, zeros, a checkpoint, a .zip, package.module:attr or file.py:attr (see
    steerloop --help)."""
    policy_kwargs: dict | None = None
    """Keyword arguments (a JSON object) for a package.module:attr or file.py:attr policy's class or factory."""
    track: str = "200000"
    """Procedural track seed or a JSON track spec path."""
    condition: str = "default"
    """Visual condition: a name (docs/world.md) or scenery.weather.camera."""
    condition_file: str | None = None
    """A JSON or TOML file of your own scenery/weather/camera values and named conditions that --condition may
    name."""
    speed: float = 10.0
    """Cruise speed [m/s]."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image size HxW [px]."""
    seed: int = 0
    """Reset seed (appearance draws)."""
    video: str | None = field(default=None, metadata={"cli": {"type": _video_file}})
    """Write an MP4 of the camera beside the top-down view to this file."""
    json: bool = False
    """Print one JSON object instead of a table."""


@dataclass
class EvaluateArgs(Backend, Progress):
    policy: str = field(default="", metadata={"cli": {"required": True}})
    """Policy spec: a checkpoint directory, .zip, expert, expert:LAW, zeros, package.module:attr or file.py:attr (see
    steerloop --help)."""
    policy_kwargs: dict | None = None
    """Keyword arguments (a JSON object) for a package.module:attr or file.py:attr policy's class or factory."""
    suite: str = "test"
    """smoke, val, test, recovery, shift, interventions or a suite JSON file."""
    condition_file: str | None = None
    """A JSON or TOML file of your own conditions that the suite's conditions may name (a suite file may name its
    own condition_file instead)."""
    out: str = field(default="", metadata={"cli": REQUIRED_OUT_DIR})
    """Results directory (resumable: finished scenarios are kept)."""
    workers: int = field(default=1, metadata={"cli": AT_LEAST_ONE})
    """Worker processes (results do not depend on it)."""
    video: int = field(default=0, metadata={"cli": {"min": 0}})
    """Write videos of the first N scenarios."""
    batch: int = field(default=4, metadata={"cli": AT_LEAST_ONE})  # = evaluation.runner.DEFAULT_BATCH
    """At most this many scenarios stepped in lockstep with batched inference."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image size HxW [px]."""


@dataclass
class OfflineArgs:
    policy: str = field(default="", metadata={"cli": {"required": True}})
    """Policy spec of a camera policy: checkpoint directory, .zip, zeros, package.module:attr or file.py:attr."""
    policy_kwargs: dict | None = None
    """Keyword arguments (a JSON object) for a package.module:attr or file.py:attr policy's class or factory."""
    data: str = field(default="", metadata={"cli": {"required": True}})
    """Held-out driving-log directory."""
    out: str | None = field(default=None, metadata={"cli": {"type": _out_file}})
    """Write the metrics as JSON to this file."""
    rollouts: int = field(default=16, metadata={"cli": AT_LEAST_ZERO})
    """K short closed-loop rollouts from states sampled from the logs (0 = none; docs/metrics.md)."""
    horizon: float = 3.0
    """[s] how long the policy drives in each short rollout."""
    warmup: float = 1.0
    """[s] logged frames fed to the policy before each short rollout starts."""
    rollout_seed: int = 0
    """Seeds the choice of the K logged states."""
    workers: int = field(default=1, metadata={"cli": AT_LEAST_ONE})
    """Short rollouts run at once, each worker with its own simulator (same results for any number)."""
    backend: str = "local"
    """Where short rollouts run: local (worker processes here) or ray (Ray tasks; same results)."""
    address: str | None = None
    """With backend ray: the cluster to use ("auto" or "HOST:PORT"); None starts a local Ray instance."""


@dataclass
class DaggerArgs(Progress):
    suite: str = "val"
    """Closed-loop suite scored after each iteration."""


@dataclass
class RegressArgs(Progress):
    policy: str = field(default="", metadata={"cli": {"required": True}})
    """Candidate: a policy spec (checkpoint directory, .zip, expert, zeros, package.module:attr, file.py:attr) or a
    results directory / results.json."""
    policy_kwargs: dict | None = None
    """Keyword arguments (a JSON object) for the candidate's class or factory."""
    baseline: str = field(default="", metadata={"cli": {"required": True}})
    """Baseline: a policy spec or a results directory / results.json."""
    baseline_kwargs: dict | None = None
    """Keyword arguments (a JSON object) for the baseline's class or factory."""
    no_cache: bool = False
    """Evaluate the policies again, replacing their cached results (a user policy's cache key may miss a change:
    see steerloop --help)."""
    suite: str | None = None
    """Suite name or JSON (default: the baseline results' suite, else test)."""
    tolerance: str | None = None
    """Per-metric tolerances, a .json or .toml file."""
    out: str | None = field(default=None, metadata={"cli": OUT_DIR})
    """Results directory root (default: the steerloop cache, $STEERLOOP_CACHE or ~/.cache/steerloop); regress.json
    is written here."""
    workers: int = field(default=1, metadata={"cli": AT_LEAST_ONE})
    """Worker processes (results do not depend on it)."""
    statistical: bool = False
    """Paired bootstrap over scenarios: fail only on a significant degradation beyond tolerance (noisy policies)."""
    resolution: tuple[int, int] | None = None
    """Camera image size HxW (default: the baseline results' resolution, else 66x200)."""
    plots: bool = False
    """Also write per-scenario plots of evaluated policies."""


@dataclass
class ValidateArgs:
    path: str = field(default="", metadata={"cli": {"positional": True}})
    """Driving-log directory."""


@dataclass
class BenchArgs:
    target: str = field(default="env", metadata={"cli": {"positional": True,
                                                         "choices": ("env", "record", "train", "eval", "scale",
                                                                     "soak")}})
    """What to benchmark (scale: evaluation on 1 and 2 local workers and on Ray; soak: RSS growth of one environment
    over distinct tracks)."""
    episodes: int = field(default=0, metadata={"cli": {"min": 0}})
    """record/eval/scale: episodes or scenarios per repeat (0: record 8, eval 20, scale 16); soak: distinct tracks (0:
    1000)."""
    batch: int | None = field(default=None, metadata={"cli": AT_LEAST_ONE})
    """eval: scenarios per lockstep group (default: as steerloop evaluate)."""
    data: str | None = None
    """train: dataset to read (default: a small fresh recording)."""
    steps: int = field(default=300, metadata={"cli": AT_LEAST_ONE})
    """Steps per repeat."""
    repeats: int = field(default=3, metadata={"cli": AT_LEAST_ONE})
    """Repeats (the median is reported)."""
    resolution: tuple[int, int] = (66, 200)
    """Camera image size HxW [px]."""
    condition: str = "default"
    """soak: the visual condition (its scenery is built for every track; env compares flat, default and the richest level and graded ones)."""
    json: bool = False
    """Print one JSON object with every figure."""


@dataclass
class StudyArgs(Backend, Progress):
    config: str = field(default="", metadata={"cli": {"required": True}})
    """Study TOML file, or a preset: default, demo, history, large."""
    out: str | None = field(default=None, metadata={"cli": OUT_DIR})
    """Study directory (stages cached by content, report.md); required unless --plan."""
    workers: int = field(default=2, metadata={"cli": AT_LEAST_ONE})
    """Worker processes for recording and evaluation (with --plan: the workers the wall time is estimated for)."""
    no_cache: bool = False
    """Run the stages of user policies ([policies.X] policy = SPEC) again, even when their cache key is unchanged."""
    plan: bool = False
    """Run nothing: print the stage counts by kind and, with --timings, an estimate of the compute."""
    timings: str | None = None
    """With --plan: a study output directory whose finished stages' measured times (OUT/stages/*.json) give the
    estimate (core-hours, and wall-hours for --workers workers)."""
    timings_cores: int = field(default=2, metadata={"cli": AT_LEAST_ONE})
    """With --timings: CPU cores of the machine that measured them (training counts its recorded threads)."""


@dataclass
class DemoArgs(Backend, Progress):
    out: str = field(default="steerloop-demo", metadata={"cli": OUT_DIR})
    """Study directory."""
    workers: int = field(default=2, metadata={"cli": AT_LEAST_ONE})
    """Worker processes for recording and evaluation."""


# ---------------------------------------------------------------------------------- commands
def _print_summary(metrics: dict) -> None:
    keys = ("success", "steps", "distance_m", "mean_abs_offset_m", "max_abs_offset_m", "rms_heading_error_rad",
            "departures", "departures_per_km", "time_outside_lane_s", "route_completion", "on_policy_rmse",
            "smoothness_per_s")
    width = max(len(k) for k in keys)
    for key in keys:
        value = metrics[key]
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {text}")


def cmd_drive(args) -> int:
    import gymnasium as gym

    from steerloop import ENV_ID
    from steerloop.agents import PolicyError, load_policy, policy_capabilities
    from steerloop.evaluation.rollout import rollout
    from steerloop.files import json_safe
    from steerloop.sim.env import load_track

    policy = load_policy(args.policy, args.policy_kwargs)
    track = load_track(args.track)
    env = gym.make(ENV_ID, track=track, condition=args.condition, condition_file=args.condition_file,
                   speed=args.speed, resolution=args.resolution,
                   privileged=policy_capabilities(policy).requires_privileged)
    video_existed = args.video is not None and Path(args.video).exists()
    try:
        episode = rollout(env, policy, seed=args.seed, video=args.video, name=f"track {track.name}",
                          policy_name=args.policy)
    except PolicyError:
        if args.video and not video_existed:
            Path(args.video).unlink(missing_ok=True)  # no half-written video
        raise
    finally:
        env.close()
    summary = {"policy": args.policy, "track": episode.info["track"], "condition": episode.info["condition"],
               **episode.metrics, "off_road": episode.off_road, "truncated": episode.truncated}
    if args.json:
        print(json.dumps(json_safe(summary), sort_keys=True, allow_nan=False))  # NaN -> null: strict JSON
    else:
        print(f"{args.policy} on {summary['track']} ({summary['condition']})")
        _print_summary(episode.metrics)
        if args.video:
            print(f"video: {args.video}")
    return 0


def cmd_record(args) -> int:
    from steerloop.training.record import RecordConfig, record

    summary = record(config_from_args(RecordConfig, args), progress=not args.quiet)
    for name, problem in summary["episodes_rerecorded"].items():
        print(f"re-recorded {name}: {problem}")
    print(f"recorded {summary['episodes_recorded']} episode(s), {summary['frames']} frames "
          f"({summary['frames_per_s']:.0f} frames/s); dataset {summary['out']} holds "
          f"{summary['episodes_total']} episode(s)")
    return 0


def cmd_train(args) -> int:
    from steerloop.training.train import TrainConfig, train

    result = train(config_from_args(TrainConfig, args), progress_bar=not args.quiet)
    print(f"best checkpoint: {result['out']}/best  val_rmse {result['val_rmse']:.4f}  "
          f"(all-zeros {result['zeros_rmse']:.4f}), {result['epochs_run']} epochs, {result['seconds']:.0f} s")
    return 0


def cmd_train_rl(args) -> int:
    from steerloop.training.rl import RLConfig, train_rl

    summary = train_rl(config_from_args(RLConfig, args), progress=not args.quiet)
    height, width = summary["resolution"]
    print(f"{summary['algorithm']}: {summary['timesteps']} steps in {summary['seconds']:.0f} s; model "
          f"{summary['model']}\nevaluate it with: steerloop evaluate --policy {summary['model']} "
          f"--resolution {height}x{width} --suite val --out {Path(args.out) / 'eval-val'}")
    return 0


def cmd_evaluate(args) -> int:
    from steerloop.evaluation.runner import evaluate, summary_table
    from steerloop.evaluation.suites import load_suite

    suite = load_suite(args.suite, args.condition_file)
    results = evaluate(args.policy, suite, args.out, policy_kwargs=args.policy_kwargs, workers=args.workers,
                       videos=args.video,
                       resolution=args.resolution, progress=not args.quiet, batch=args.batch,
                       backend=args.backend, address=args.address)
    print(summary_table(results))
    print(f"results: {args.out}/results.json")
    return 0


def cmd_offline(args) -> int:
    from steerloop.evaluation.offline import evaluate_offline, offline_table

    from steerloop.evaluation.short_loop import ShortLoopConfig

    short = ShortLoopConfig(rollouts=args.rollouts, horizon=args.horizon, warmup=args.warmup, seed=args.rollout_seed)
    result = evaluate_offline(args.policy, args.data, args.out, policy_kwargs=args.policy_kwargs, short=short,
                              workers=args.workers, backend=args.backend, address=args.address,
                              progress=sys.stderr.isatty())
    print(offline_table(result))
    if args.out:
        print(f"written: {args.out}")
    return 0


def cmd_dagger(args) -> int:
    from steerloop.evaluation.runner import evaluate
    from steerloop.evaluation.suites import load_suite
    from steerloop.paths import path_under
    from steerloop.training.dagger import DaggerConfig, run_dagger

    cfg = config_from_args(DaggerConfig, args)
    suite = load_suite(args.suite)
    manifest = Path(cfg.data[0]) / "manifest.json"
    resolution = tuple(json.loads(manifest.read_text())["resolution"]) if manifest.exists() else (66, 200)

    def closed_loop(checkpoint: str, iteration: int) -> dict:
        results = evaluate(checkpoint, suite, path_under(cfg.out, f"iter_{iteration:02d}", f"eval-{suite.name}"),
                           workers=cfg.workers, progress=not args.quiet, plots=False, resolution=resolution,
                           backend=cfg.backend, address=cfg.address)
        agg = results["aggregate"]
        return {key: agg[key] for key in ("success_rate", "mean_abs_offset_m", "on_policy_rmse")}

    rows = run_dagger(cfg, closed_loop, progress=not args.quiet)
    print(f"{'iteration':>9} {'beta':>5} {'frames':>7} {'success':>8} {'mean|offset|':>12} {'on-policy RMSE':>14}")
    for row in rows:
        m = row["closed_loop"]
        print(f"{row['iteration']:>9} {row['beta']:>5.2f} {row['frames']:>7} {m['success_rate']:>8.2f} "
              f"{m['mean_abs_offset_m']:>12.3f} {m['on_policy_rmse']:>14.4f}")
    print(f"table: {cfg.out}/dagger.json")
    return 0


def cmd_validate(args) -> int:
    from steerloop.driving_log import validate

    problems = validate(args.path)
    for line in problems:
        print(line)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.path}: valid")
    return 0


def cmd_bench(args) -> int:
    from steerloop.evaluation.bench import (bench_env, bench_eval, bench_record, bench_scale, bench_soak, bench_train,
                                            format_table)

    if args.target == "env":
        result = bench_env(steps=args.steps, repeats=args.repeats, resolution=args.resolution)
    elif args.target == "soak":
        result = bench_soak(tracks=args.episodes or 1000, resolution=args.resolution, condition=args.condition)
    elif args.target == "record":
        result = bench_record(episodes=args.episodes or 8, repeats=args.repeats, resolution=args.resolution)
    elif args.target == "train":
        result = bench_train(data=args.data, repeats=args.repeats)
    elif args.target == "scale":
        from steerloop.parallel import check_backend

        check_backend("ray")
        result = bench_scale(scenarios=args.episodes or 16, repeats=args.repeats)
    else:
        result = bench_eval(scenarios=args.episodes or 20, repeats=args.repeats, batch=args.batch)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        title = "bench soak (RSS over distinct tracks)" if args.target == "soak" else \
            f"bench {args.target} (medians of {result['repeats']} repeats)"
        print(format_table(title, result))
    return 0


def cmd_study(args) -> int:
    from steerloop.evaluation.study import StudyError, load_study, plan_study, run_study

    if args.timings is not None and not args.plan:
        raise StudyError("--timings gives the measured times for --plan's estimate: add --plan")
    if not args.plan and not args.out:
        raise StudyError("--out is required: the study directory (only --plan runs without one)")
    cfg = load_study(args.config)
    if args.plan:
        from steerloop.evaluation.estimate import plan_text

        print(plan_text(plan_study(cfg, args.out or "study-plan"), args.timings, workers=args.workers,
                        cores=args.timings_cores))
        return 0
    run_study(cfg, args.out, workers=args.workers, progress=not args.quiet, backend=args.backend,
              address=args.address, no_cache=args.no_cache)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_regress(args) -> int:
    from steerloop.evaluation.regress import regress

    return regress(args.policy, args.baseline, suite=args.suite, tolerance=args.tolerance, out=args.out,
                   workers=args.workers, statistical=args.statistical, resolution=args.resolution,
                   progress=not args.quiet, plots=args.plots, candidate_kwargs=args.policy_kwargs,
                   baseline_kwargs=args.baseline_kwargs, no_cache=args.no_cache)


# ------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``steerloop evaluate: argument --workers: ...`` (exit 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _config(module: str, name: str):
    """A library config dataclass, imported only for the command that needs it (the training
    modules import torch: ~2 s that ``validate`` or ``--help`` should not pay)."""
    return lambda: vars(importlib.import_module(module))[name]


def _own(config):
    return lambda: config


# (command, help, configs (loader, per-command details), handler, what an interrupted run keeps)
def _commands():
    backend = {"backend": BACKENDS}
    progress = (_own(Progress), {})
    return [
        ("drive", "drive one episode and print its drift summary", [(_own(DriveArgs), {})], cmd_drive, ""),
        ("record", "record expert driving into a driving log (resumable)",
         [(_config("steerloop.training.record", "RecordConfig"),
           {"out": REQUIRED_OUT_DIR, "episodes": AT_LEAST_ONE, "workers": AT_LEAST_ONE, **backend}), progress],
         cmd_record, "completed episodes are kept; re-run the same command to record the rest"),
        ("train", "behaviour cloning from driving logs (resumable)",
         [(_config("steerloop.training.train", "TrainConfig"),
           {"data": {"required": True}, "out": REQUIRED_OUT_DIR, "seq_len": {"min": 0}, "epochs": AT_LEAST_ONE,
            "batch_frames": AT_LEAST_ONE, "threads": AT_LEAST_ONE}), progress],
         cmd_train, "re-run the same command to resume from OUT/trainer_state"),
        ("train-rl", "PPO (stable-baselines3) in closed loop on training tracks (resumable)",
         [(_config("steerloop.training.rl", "RLConfig"),
           {"out": REQUIRED_OUT_DIR, "algo": {"choices": ("ppo",)}, "timesteps": AT_LEAST_ONE, "envs": AT_LEAST_ONE,
            "tracks": AT_LEAST_ONE, "n_steps": AT_LEAST_ONE, "save_every": AT_LEAST_ONE, "threads": AT_LEAST_ONE}),
          progress], cmd_train_rl, "re-run the same command to continue from the newest OUT/checkpoints/*.zip"),
        ("evaluate", "closed-loop evaluation of a policy over a scenario suite (resumable)",
         [(_own(EvaluateArgs), {})], cmd_evaluate, "finished scenarios are kept; re-run the same command to finish"),
        ("offline", "offline metrics on held-out logs, beside the all-zeros predictor", [(_own(OfflineArgs), {})],
         cmd_offline, ""),
        ("dagger", "DAgger: learner drives, expert labels, retrain on the aggregate (resumable)",
         [(_config("steerloop.training.dagger", "DaggerConfig"),
           {"init": {"required": True}, "data": {"required": True}, "out": REQUIRED_OUT_DIR,
            "iterations": AT_LEAST_ONE, "episodes_per_iter": AT_LEAST_ONE, "epochs": AT_LEAST_ONE,
            "workers": AT_LEAST_ONE, **backend}), (_own(DaggerArgs), {})],
         cmd_dagger, "re-run the same command to resume (OUT/dagger.json)"),
        ("regress", "regression gate: compare a candidate policy with a baseline; exit 0 no regression, "
         "1 regression, 2 could not compare", [(_own(RegressArgs), {})], cmd_regress,
         "finished scenarios are kept; re-run the same command to finish"),
        ("validate", "check a driving log; one line per problem, non-zero exit if any", [(_own(ValidateArgs), {})],
         cmd_validate, ""),
        ("bench", "throughput benchmarks, measured side by side", [(_own(BenchArgs), {})], cmd_bench, ""),
        ("study", "the offline-vs-closed-loop gap study: record, train, evaluate, report (cached)",
         [(_own(StudyArgs), {})], cmd_study, "re-run the same command to resume"),
        ("demo", "a small preset of the gap study (its measured run time is in the README)",
         [(_own(DemoArgs), {})], cmd_study, "re-run the same command to resume"),
    ]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the flags of that one command (the others are
    listed by name and help), so a command imports only the configs it needs."""
    parser = _Parser(prog="steerloop", description=__doc__.split("\n\n")[0], epilog=POLICIES_HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, configs, handler, interrupted in _commands():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None and name != only:
            continue
        for load, details in configs:
            add_flags(command, load(), skip=("extra",), cli=details)
        flags = {action.dest: action.option_strings[-1] for action in command._actions if action.option_strings
                 and action.dest != "help"}
        command.set_defaults(func=handler, interrupted=interrupted, flags=flags)
    sub.choices["demo"].set_defaults(config="demo", no_cache=False, plan=False, timings=None, timings_cores=2)
    return parser


def _one_line(error: BaseException) -> str:
    """A user-facing error as one line (an OSError names its file and what to check)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror} (check the path, its permissions and free disk space)"
    if isinstance(error, RecursionError):
        return "an input file is nested too deeply to be a steerloop file"
    return " ".join(str(error).split())


def _as_flags(message: str, flags: dict[str, str]) -> str:
    """A library message names config fields (``track_length must be ...``); on the command
    line the same names are flags (``--track-length must be ...``). A field name is rewritten
    where it is the subject of the message: right before ``must``, ``needs``, a colon or an
    index (``conditions[1]:``)."""
    def flag(match: re.Match) -> str:
        name = match.group(0)
        after = message[match.end():match.end() + 6]
        return flags[name] if name in flags and after.startswith((" must", " needs", ":", "[")) else name

    return re.sub(r"(?<![\w.\-/])[a-z][a-z0-9_]*(?![\w.\-/])", flag, message)


def _raise_interrupt(signum, frame) -> None:
    """SIGTERM (timeout, CI cancellation, schedulers) stops a command the way Ctrl-C does;
    further SIGTERMs are ignored while it shuts down (SIGKILL still ends it)."""
    _TERMINATED.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _run_command(args) -> int:
    """Run the chosen command: a user error is one line (exit 2); Ctrl-C and SIGTERM exit 130
    and 143 after the command's own clean-up, saying what was kept."""
    from steerloop.errors import SteerloopError

    terminated = len(_TERMINATED)
    try:
        return args.func(args)
    except (SteerloopError, ValueError, OSError, RecursionError) as error:
        print(f"steerloop {args.command}: {_as_flags(_one_line(error), args.flags)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = args.interrupted.replace("OUT", str(vars(args).get("out") or "the output directory"))
        print(f"steerloop {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_TERMINATED if len(_TERMINATED) > terminated else EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Run one command; see the module docstring for the exit codes."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {name for name, *_ in _commands()}
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(chosen if chosen in names else None).parse_args(argv)
    np.set_printoptions(precision=4)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return _run_command(args)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run_command(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
