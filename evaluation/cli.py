"""The ``steerloop`` command line: one entry point composing sim, agents, training and evaluation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

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
"""


def _json_kwargs(text: str) -> dict:
    """--policy-kwargs: a JSON object of keyword arguments for a user's policy class or factory."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}); give an object like "
                                         "'{\"weights\": \"w.pt\"}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of keyword arguments, got {type(value).__name__}")
    return value


def _resolution(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must look like 66x200 (HxW), got {text!r}") from None
    return height, width


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

    import steerloop.sim  # noqa: F401  (registers the env)
    from steerloop.agents import PolicyError, load_policy, policy_capabilities
    from steerloop.evaluation.rollout import rollout
    from steerloop.sim.env import load_track
    from steerloop.sim.track import TrackSpecError

    try:
        policy = load_policy(args.policy, args.policy_kwargs)
        track = load_track(args.track)
    except (ValueError, TrackSpecError, FileNotFoundError) as error:
        print(f"steerloop drive: {error}", file=sys.stderr)
        return 2
    env = gym.make("steerloop/LaneKeep-v0", track=track, condition=args.condition, speed=args.speed,
                   resolution=args.resolution, privileged=policy_capabilities(policy).requires_privileged)
    video_existed = args.video is not None and Path(args.video).exists()
    try:
        episode = rollout(env, policy, seed=args.seed, video=args.video, name=f"track {track.name}",
                          policy_name=args.policy)
    except PolicyError as error:
        if args.video and not video_existed:
            Path(args.video).unlink(missing_ok=True)  # no half-written video
        print(f"steerloop drive: {error}", file=sys.stderr)
        return 2
    finally:
        env.close()
    summary = {"policy": args.policy, "track": episode.info["track"], "condition": episode.info["condition"],
               **episode.metrics, "off_road": episode.off_road, "truncated": episode.truncated}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"{args.policy} on {summary['track']} ({summary['condition']})")
        _print_summary(episode.metrics)
        if args.video:
            print(f"video: {args.video}")
    return 0


def _add_backend_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="local", choices=["local", "ray"],
                        help="run episodes/scenarios in local worker processes or as Ray tasks (same results)")
    parser.add_argument("--address", default=None,
                        help="with --backend ray: the Ray cluster, 'auto' or HOST:PORT (default: start a local "
                             "Ray instance with --workers CPUs)")


def _add_kwargs_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy-kwargs", type=_json_kwargs, default=None, metavar="JSON",
                        help="keyword arguments (a JSON object) for a package.module:attr or file.py:attr policy's "
                             "class or factory")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def cmd_record(args) -> int:
    from steerloop.sim.log import LogError
    from steerloop.sim.track import TrackSpecError
    from steerloop.training.record import RecordConfig, record

    try:
        cfg = RecordConfig(out=args.out, episodes=args.episodes, suite=args.suite, seed=args.seed, track=args.track,
                           track_length=args.track_length, noise=args.noise, noise_kind=args.noise_kind,
                           cameras=_csv(args.cameras), conditions=_csv(args.conditions),
                           resolution=args.resolution, speed=args.speed, expert=args.expert, workers=args.workers,
                           backend=args.backend, address=args.address, learner=args.learner,
                           learner_kwargs=args.learner_kwargs, beta=args.beta, mixture=args.mixture)
        summary = record(cfg, progress=not args.quiet)
    except (ValueError, TrackSpecError, FileNotFoundError, LogError) as error:
        print(f"steerloop record: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steerloop record: interrupted; completed episodes are kept in {args.out}. "
              "Re-run the same command to record the rest.", file=sys.stderr)
        return 130
    print(f"recorded {summary['episodes_recorded']} episode(s), {summary['frames']} frames "
          f"({summary['frames_per_s']:.0f} frames/s); dataset {summary['out']} holds "
          f"{summary['episodes_total']} episode(s)")
    return 0


def cmd_train(args) -> int:
    from steerloop.agents.checkpoint import CheckpointError
    from steerloop.sim.log import LogError
    from steerloop.training.train import TrainConfig, train

    try:
        cfg = TrainConfig(data=args.data, out=args.out, model=args.model, seq_len=args.seq_len, epochs=args.epochs,
                          batch_frames=args.batch_frames, camera=args.camera, augment=_csv(args.augment),
                          seed=args.seed, threads=args.threads, lr=args.lr)
        result = train(cfg, progress_bar=not args.quiet)
    except (ValueError, LogError, CheckpointError) as error:
        print(f"steerloop train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steerloop train: interrupted; re-run the same command to resume from {args.out}/trainer_state",
              file=sys.stderr)
        return 130
    print(f"best checkpoint: {result['out']}/best  val_rmse {result['val_rmse']:.4f}  "
          f"(all-zeros {result['zeros_rmse']:.4f}), {result['epochs_run']} epochs, {result['seconds']:.0f} s")
    return 0


def cmd_train_rl(args) -> int:
    from steerloop.training.rl import RLConfig, train_rl

    try:
        cfg = RLConfig(out=args.out, algo=args.algo, timesteps=args.timesteps, envs=args.envs,
                       recurrent=args.recurrent, init=args.init, seed=args.seed, resolution=args.resolution,
                       track_length=args.track_length, tracks=args.tracks, conditions=_csv(args.conditions),
                       n_steps=args.n_steps, save_every=args.save_every, threads=args.threads)
        summary = train_rl(cfg, progress=not args.quiet)
    except ValueError as error:
        print(f"steerloop train-rl: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steerloop train-rl: interrupted; re-run the same command to continue from the newest "
              f"{args.out}/checkpoints/*.zip", file=sys.stderr)
        return 130
    height, width = summary["resolution"]
    print(f"{summary['algorithm']}: {summary['timesteps']} steps in {summary['seconds']:.0f} s; model "
          f"{summary['model']}\nevaluate it with: steerloop evaluate --policy {summary['model']} "
          f"--resolution {height}x{width} --suite val --out {Path(args.out) / 'eval-val'}")
    return 0


def cmd_evaluate(args) -> int:
    from steerloop.agents.checkpoint import CheckpointError
    from steerloop.evaluation.runner import ResultsError, evaluate, summary_table
    from steerloop.evaluation.suites import SuiteError, load_suite

    try:
        suite = load_suite(args.suite)
        results = evaluate(args.policy, suite, args.out, policy_kwargs=args.policy_kwargs, workers=args.workers,
                           videos=args.video,
                           resolution=args.resolution, progress=not args.quiet, batch=args.batch,
                           backend=args.backend, address=args.address)
    except (ValueError, SuiteError, ResultsError, CheckpointError, FileNotFoundError) as error:
        print(f"steerloop evaluate: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steerloop evaluate: interrupted; finished scenarios are kept in {args.out}. "
              "Re-run the same command to finish.", file=sys.stderr)
        return 130
    print(summary_table(results))
    print(f"results: {args.out}/results.json")
    return 0


def cmd_offline(args) -> int:
    from steerloop.agents.checkpoint import CheckpointError
    from steerloop.evaluation.offline import evaluate_offline, offline_table
    from steerloop.sim.log import LogError

    try:
        result = evaluate_offline(args.policy, args.data, args.out, policy_kwargs=args.policy_kwargs)
    except (ValueError, LogError, CheckpointError) as error:
        print(f"steerloop offline: {error}", file=sys.stderr)
        return 2
    print(offline_table(result))
    if args.out:
        print(f"written: {args.out}")
    return 0


def cmd_dagger(args) -> int:
    from steerloop.agents.checkpoint import CheckpointError
    from steerloop.evaluation.runner import evaluate
    from steerloop.evaluation.suites import load_suite
    from steerloop.sim.log import LogError
    from steerloop.training.dagger import DaggerConfig, run_dagger

    suite = load_suite(args.suite)
    manifest = Path(args.data[0]) / "manifest.json"
    resolution = tuple(json.loads(manifest.read_text())["resolution"]) if manifest.exists() else (66, 200)

    def closed_loop(checkpoint: str, iteration: int) -> dict:
        results = evaluate(checkpoint, suite, f"{args.out}/iter_{iteration:02d}/eval-{suite.name}",
                           workers=args.workers, progress=not args.quiet, plots=False, resolution=resolution,
                           backend=args.backend, address=args.address)
        agg = results["aggregate"]
        return {key: agg[key] for key in ("success_rate", "mean_abs_offset_m", "on_policy_rmse")}

    try:
        cfg = DaggerConfig(init=args.init, data=args.data, out=args.out, iterations=args.iterations,
                           episodes_per_iter=args.episodes_per_iter,
                           beta_schedule=tuple(float(b) for b in _csv(args.beta_schedule)), mixture=args.mixture,
                           retrain=args.retrain, epochs=args.epochs, workers=args.workers, seed=args.seed,
                           backend=args.backend, address=args.address)
        rows = run_dagger(cfg, closed_loop, progress=not args.quiet)
    except (ValueError, LogError, CheckpointError) as error:
        print(f"steerloop dagger: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steerloop dagger: interrupted; re-run the same command to resume ({args.out}/dagger.json)",
              file=sys.stderr)
        return 130
    print(f"{'iteration':>9} {'beta':>5} {'frames':>7} {'success':>8} {'mean|offset|':>12} {'on-policy RMSE':>14}")
    for row in rows:
        m = row["closed_loop"]
        print(f"{row['iteration']:>9} {row['beta']:>5.2f} {row['frames']:>7} {m['success_rate']:>8.2f} "
              f"{m['mean_abs_offset_m']:>12.3f} {m['on_policy_rmse']:>14.4f}")
    print(f"table: {args.out}/dagger.json")
    return 0


def cmd_validate(args) -> int:
    from steerloop.sim.log import validate

    problems = validate(args.path)
    for line in problems:
        print(line)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.path}: valid")
    return 0


def cmd_bench(args) -> int:
    from steerloop.evaluation.bench import bench_env, bench_eval, bench_record, bench_scale, bench_train, format_table

    if args.target == "env":
        result = bench_env(steps=args.steps, repeats=args.repeats, resolution=args.resolution)
    elif args.target == "record":
        result = bench_record(episodes=args.episodes or 8, repeats=args.repeats, resolution=args.resolution)
    elif args.target == "train":
        result = bench_train(data=args.data, repeats=args.repeats)
    elif args.target == "scale":
        from steerloop.sim.parallel import BackendError, check_backend

        try:
            check_backend("ray")
        except BackendError as error:
            print(f"steerloop bench scale: {error}", file=sys.stderr)
            return 2
        result = bench_scale(scenarios=args.episodes or 16, repeats=args.repeats)
    else:
        result = bench_eval(scenarios=args.episodes or 20, repeats=args.repeats, batch=args.batch)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_table(f"bench {args.target} (medians of {result['repeats']} repeats)", result))
    return 0


def cmd_study(args) -> int:
    from steerloop.agents.checkpoint import CheckpointError
    from steerloop.evaluation.runner import ResultsError
    from steerloop.evaluation.study import StudyError, load_study, run_study
    from steerloop.sim.log import LogError

    if args.workers < 1:
        print(f"steerloop study: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        cfg = load_study(args.config)
        run_study(cfg, args.out, workers=args.workers, progress=not args.quiet, backend=args.backend,
                  address=args.address, no_cache=args.no_cache)
    except (StudyError, ResultsError, LogError, CheckpointError, ValueError) as error:
        print(f"steerloop study: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steerloop study: interrupted; re-run the same command to resume ({args.out})", file=sys.stderr)
        return 130
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_regress(args) -> int:
    from steerloop.evaluation.regress import regress

    try:
        return regress(args.policy, args.baseline, suite=args.suite, tolerance=args.tolerance, out=args.out,
                       workers=args.workers, statistical=args.statistical, resolution=args.resolution,
                       progress=not args.quiet, plots=args.plots, candidate_kwargs=args.policy_kwargs,
                       baseline_kwargs=args.baseline_kwargs, no_cache=args.no_cache)
    except KeyboardInterrupt:
        print("steerloop regress: interrupted; finished scenarios are kept. Re-run the same command to finish.",
              file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerloop", description=__doc__, epilog=POLICIES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    drive = sub.add_parser("drive", help="drive one episode and print its drift summary")
    drive.add_argument("--policy", default="expert", help="policy spec: expert, expert:LAW, zeros, a checkpoint, "
                       "a .zip, package.module:attr or file.py:attr (default: expert; see steerloop --help)")
    _add_kwargs_arg(drive)
    drive.add_argument("--track", default="200000", help="procedural track seed or a JSON track spec path")
    drive.add_argument("--condition", default="default", help="visual condition (default, dusk, worn, desert)")
    drive.add_argument("--speed", type=float, default=10.0, help="cruise speed [m/s]")
    drive.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW (default 66x200)")
    drive.add_argument("--seed", type=int, default=0, help="reset seed (appearance draws)")
    drive.add_argument("--video", default=None, help="write an MP4 of the camera beside the top-down view")
    drive.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    drive.set_defaults(func=cmd_drive)

    rec = sub.add_parser("record", help="record expert driving into a driving log (resumable)")
    rec.add_argument("--out", required=True, help="dataset directory")
    rec.add_argument("--episodes", type=int, default=20, help="number of episodes (default 20)")
    rec.add_argument("--suite", default="train", help="track split: train, val or test (default train)")
    rec.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    rec.add_argument("--track", default=None, help="record on this JSON track spec instead of the suite's tracks")
    rec.add_argument("--track-length", type=float, default=400.0, help="procedural route length [m]")
    rec.add_argument("--noise", type=float, default=0.0, help="DART steering noise scale (default 0)")
    rec.add_argument("--noise-kind", default="gaussian", help="gaussian or ou")
    rec.add_argument("--cameras", default="center", help="comma-separated: center,left,right")
    rec.add_argument("--conditions", default="default", help="comma-separated visual conditions")
    rec.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW (default 66x200)")
    rec.add_argument("--speed", type=float, default=10.0, help="cruise speed [m/s]")
    rec.add_argument("--expert", default="stanley", help="expert law: stanley or pure_pursuit")
    rec.add_argument("--workers", type=int, default=1, help="worker processes (content does not depend on it)")
    rec.add_argument("--learner", default=None, help="DAgger: policy spec (checkpoint, .zip, package.module:attr, "
                     "file.py:attr) that drives when the expert does not")
    rec.add_argument("--learner-kwargs", type=_json_kwargs, default=None, metavar="JSON",
                     help="keyword arguments (a JSON object) for a --learner class or factory")
    rec.add_argument("--beta", type=float, default=1.0, help="DAgger: probability that the expert drives")
    rec.add_argument("--mixture", default="step", help="DAgger: flip the expert/learner coin per step or episode")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_backend_args(rec)
    rec.set_defaults(func=cmd_record)

    tr = sub.add_parser("train", help="behaviour cloning from driving logs (resumable)")
    tr.add_argument("--data", action="append", required=True, help="dataset directory (repeat for several)")
    tr.add_argument("--model", default="cnn-lstm", help="pilotnet, cnn-lstm or conv3d-lstm")
    tr.add_argument("--out", required=True, help="output directory (checkpoints best/ and last/)")
    tr.add_argument("--seq-len", type=int, default=0, help="window length T (default 1 for pilotnet, 16 otherwise)")
    tr.add_argument("--epochs", type=int, default=4, help="maximum epochs (default 4)")
    tr.add_argument("--batch-frames", type=int, default=128, help="frames per optimiser step (default 128)")
    tr.add_argument("--camera", default="center", help="center, or all (side cameras with corrective labels)")
    tr.add_argument("--augment", default="shift,jitter", help="comma-separated: side, shift, jitter ('' for none)")
    tr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    tr.add_argument("--seed", type=int, default=0, help="seed (split, init, augmentation)")
    tr.add_argument("--threads", type=int, default=2, help="torch threads (recorded in the checkpoint)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    rl = sub.add_parser("train-rl", help="PPO (stable-baselines3) in closed loop on training tracks (resumable)")
    rl.add_argument("--algo", default="ppo", help="ppo (the only one)")
    rl.add_argument("--out", required=True, help="run directory (model.zip, checkpoints/)")
    rl.add_argument("--timesteps", type=int, default=100_000, help="environment steps in total (default 100000)")
    rl.add_argument("--envs", type=int, default=1, help="parallel environments (SubprocVecEnv; default 1)")
    rl.add_argument("--init", default=None, help="behaviour-cloning checkpoint distilled into the policy first")
    rl.add_argument("--recurrent", action="store_true", help="RecurrentPPO (LSTM) from sb3-contrib")
    rl.add_argument("--seed", type=int, default=0, help="seed (PPO, environments, distillation)")
    rl.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW (default 66x200)")
    rl.add_argument("--track-length", type=float, default=200.0, help="procedural route length [m] (default 200)")
    rl.add_argument("--tracks", type=int, default=100, help="routes come from the first N training tracks")
    rl.add_argument("--conditions", default="default", help="comma-separated visual conditions")
    rl.add_argument("--n-steps", type=int, default=512, help="steps per environment between PPO updates")
    rl.add_argument("--save-every", type=int, default=10_000, help="steps between resumable checkpoints")
    rl.add_argument("--threads", type=int, default=1, help="torch threads of the learner")
    rl.add_argument("--quiet", action="store_true", help="no progress bar")
    rl.set_defaults(func=cmd_train_rl)

    ev = sub.add_parser("evaluate", help="closed-loop evaluation of a policy over a scenario suite (resumable)")
    ev.add_argument("--policy", required=True, help="policy spec: checkpoint directory, .zip, expert, expert:LAW, "
                    "zeros, package.module:attr or file.py:attr (see steerloop --help)")
    _add_kwargs_arg(ev)
    ev.add_argument("--suite", default="test", help="smoke, test, recovery, shift, interventions or a suite JSON")
    ev.add_argument("--out", required=True, help="results directory")
    ev.add_argument("--workers", type=int, default=1, help="worker processes (results do not depend on it)")
    ev.add_argument("--video", type=int, default=0, help="write videos of the first N scenarios")
    ev.add_argument("--batch", type=int, default=4,  # evaluation.runner.DEFAULT_BATCH (not imported: pybullet)
                    help="at most this many scenarios stepped in lockstep with batched inference (default 4)")
    ev.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW (default 66x200)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_backend_args(ev)
    ev.set_defaults(func=cmd_evaluate)

    off = sub.add_parser("offline", help="offline metrics on held-out logs, beside the all-zeros predictor")
    off.add_argument("--policy", required=True, help="policy spec of a camera policy: checkpoint directory, .zip, "
                     "zeros, package.module:attr or file.py:attr")
    _add_kwargs_arg(off)
    off.add_argument("--data", required=True, help="held-out dataset directory")
    off.add_argument("--out", default=None, help="write the metrics as JSON here")
    off.set_defaults(func=cmd_offline)

    dg = sub.add_parser("dagger", help="DAgger: learner drives, expert labels, retrain on the aggregate (resumable)")
    dg.add_argument("--init", required=True, help="behaviour-cloning checkpoint to start from")
    dg.add_argument("--data", action="append", required=True, help="the expert dataset(s) it was trained on")
    dg.add_argument("--out", required=True, help="run directory")
    dg.add_argument("--iterations", type=int, default=4, help="DAgger iterations (default 4)")
    dg.add_argument("--episodes-per-iter", type=int, default=10, help="episodes recorded per iteration")
    dg.add_argument("--beta-schedule", default="0.5,0.25,0", help="beta per iteration; the last repeats")
    dg.add_argument("--mixture", default="step", help="flip the expert/learner coin per step or per episode")
    dg.add_argument("--retrain", default="scratch", help="scratch or finetune")
    dg.add_argument("--epochs", type=int, default=4, help="training epochs per iteration")
    dg.add_argument("--suite", default="val", help="closed-loop suite scored after each iteration (default val)")
    dg.add_argument("--workers", type=int, default=1, help="worker processes for recording and evaluation")
    dg.add_argument("--seed", type=int, default=0, help="seed")
    dg.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_backend_args(dg)
    dg.set_defaults(func=cmd_dagger)

    rg = sub.add_parser("regress", help="regression gate: compare a candidate policy with a baseline; "
                        "exit 0 no regression, 1 regression, 2 could not compare")
    rg.add_argument("--policy", required=True, help="candidate: a policy spec (checkpoint directory, .zip, expert, "
                    "zeros, package.module:attr, file.py:attr) or a results directory / results.json")
    _add_kwargs_arg(rg)
    rg.add_argument("--baseline", required=True, help="baseline: a policy spec or a results directory / results.json")
    rg.add_argument("--baseline-kwargs", type=_json_kwargs, default=None, metavar="JSON",
                    help="keyword arguments (a JSON object) for the baseline's class or factory")
    rg.add_argument("--no-cache", action="store_true", help="evaluate the policies again, replacing their cached "
                    "results (a user policy's cache key may miss a change: see steerloop --help)")
    rg.add_argument("--suite", default=None, help="suite name or JSON (default: the baseline results' suite, "
                    "else test)")
    rg.add_argument("--tolerance", default=None, help="per-metric tolerances, a .json or .toml file")
    rg.add_argument("--out", default=None, help="results directory root (default: the steerloop cache, "
                    "$STEERLOOP_CACHE or ~/.cache/steerloop); regress.json is written here")
    rg.add_argument("--workers", type=int, default=1, help="worker processes (results do not depend on it)")
    rg.add_argument("--statistical", action="store_true", help="paired bootstrap over scenarios: fail only on "
                    "a significant degradation beyond tolerance (noisy policies)")
    rg.add_argument("--resolution", type=_resolution, default=None, help="camera HxW (default: the baseline "
                    "results' resolution, else 66x200)")
    rg.add_argument("--plots", action="store_true", help="also write per-scenario plots of evaluated policies")
    rg.add_argument("--quiet", action="store_true", help="no progress bar")
    rg.set_defaults(func=cmd_regress)

    val = sub.add_parser("validate", help="check a driving log; one line per problem, non-zero exit if any")
    val.add_argument("path", help="dataset directory")
    val.set_defaults(func=cmd_validate)

    bench = sub.add_parser("bench", help="throughput benchmarks, measured side by side")
    bench.add_argument("target", choices=["env", "record", "train", "eval", "scale"],
                       help="what to benchmark (scale: evaluation on 1 and 2 local workers and on Ray)")
    bench.add_argument("--episodes", type=int, default=0, help="record/eval/scale: episodes or scenarios per repeat "
                       "(record 8, eval 20, scale 16)")
    bench.add_argument("--batch", type=int, default=None, help="eval: scenarios per lockstep group (default: as "
                       "steerloop evaluate)")
    bench.add_argument("--data", default=None, help="train: dataset to read (default: a small fresh recording)")
    bench.add_argument("--steps", type=int, default=300, help="steps per repeat")
    bench.add_argument("--repeats", type=int, default=3, help="repeats (the median is reported)")
    bench.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW")
    bench.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    bench.set_defaults(func=cmd_bench)

    st = sub.add_parser("study", help="the offline-vs-closed-loop gap study: record, train, evaluate, report (cached)")
    st.add_argument("--config", required=True, help="study TOML file, or a preset: default, demo")
    st.add_argument("--out", required=True, help="study directory (stages cached by content, report.md)")
    st.add_argument("--workers", type=int, default=2, help="worker processes for recording and evaluation")
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    st.add_argument("--no-cache", action="store_true", help="run the stages of user policies ([policies.X] policy = "
                    "SPEC) again, even when their cache key is unchanged")
    _add_backend_args(st)
    st.set_defaults(func=cmd_study)

    demo = sub.add_parser("demo", help="a small preset of the gap study (about 15 minutes on 2 CPU cores)")
    demo.add_argument("--out", default="steerloop-demo", help="study directory (default: steerloop-demo)")
    demo.add_argument("--workers", type=int, default=2, help="worker processes for recording and evaluation")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_backend_args(demo)
    demo.set_defaults(func=cmd_study, config="demo", no_cache=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    np.set_printoptions(precision=4)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
