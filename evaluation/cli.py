"""The ``steerloop`` command line: one entry point composing sim, agents, training and evaluation."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


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

    import sim  # noqa: F401  (registers the env)
    from agents import load_policy
    from evaluation.rollout import rollout
    from sim.env import load_track
    from sim.track import TrackSpecError

    try:
        policy = load_policy(args.policy)
        track = load_track(args.track)
    except (ValueError, TrackSpecError, FileNotFoundError) as error:
        print(f"steerloop drive: {error}", file=sys.stderr)
        return 2
    env = gym.make("steerloop/LaneKeep-v0", track=track, condition=args.condition, speed=args.speed,
                   resolution=args.resolution, privileged=getattr(policy, "requires_privileged", False))
    try:
        episode = rollout(env, policy, seed=args.seed, video=args.video)
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


def cmd_bench(args) -> int:
    from evaluation.bench import bench_env, format_table

    if args.target != "env":
        print(f"steerloop bench: unknown target {args.target!r}; available: env", file=sys.stderr)
        return 2
    result = bench_env(steps=args.steps, repeats=args.repeats, resolution=args.resolution)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_table(f"bench env ({result['resolution'][0]}x{result['resolution'][1]}, "
                           f"median of {result['repeats']} x {result['steps_per_repeat']} steps)", result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    drive = sub.add_parser("drive", help="drive one episode and print its drift summary")
    drive.add_argument("--policy", default="expert", help="expert, expert:pure_pursuit or zeros (default: expert)")
    drive.add_argument("--track", default="200000", help="procedural track seed or a JSON track spec path")
    drive.add_argument("--condition", default="default", help="visual condition (default, dusk, worn, desert)")
    drive.add_argument("--speed", type=float, default=10.0, help="cruise speed [m/s]")
    drive.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW (default 66x200)")
    drive.add_argument("--seed", type=int, default=0, help="reset seed (appearance draws)")
    drive.add_argument("--video", default=None, help="write an MP4 of the camera beside the top-down view")
    drive.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    drive.set_defaults(func=cmd_drive)

    bench = sub.add_parser("bench", help="throughput benchmarks, measured side by side")
    bench.add_argument("target", choices=["env"], help="what to benchmark")
    bench.add_argument("--steps", type=int, default=300, help="steps per repeat")
    bench.add_argument("--repeats", type=int, default=5, help="repeats (the median is reported)")
    bench.add_argument("--resolution", type=_resolution, default=(66, 200), help="camera HxW")
    bench.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    np.set_printoptions(precision=4)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
