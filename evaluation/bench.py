"""``steerloop bench ...``: throughput measured side by side in one run; medians of repeats."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from sim.camera import body_camera_matrices, render
from sim.env import LaneKeepEnv

BENCH_TRACK = 200_000  # the first test-split track


def _median_rate(fn, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of ``steps / seconds`` for ``fn(steps)``."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(steps)
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_env(steps: int = 300, repeats: int = 5, resolution: tuple[int, int] = (66, 200)) -> dict:
    """Bare getCameraImage frames/s and bare physics control-steps/s on the same scene,
    next to the environment's own steps/s, interleaved repeat by repeat.

    The car follows the expert along a test track (300 steps stay on the route, so no
    reset is timed); bare rendering replays the camera poses of that same drive.
    """
    torch.set_num_threads(1)
    env = LaneKeepEnv(track=BENCH_TRACK, resolution=resolution)
    env.reset(seed=0)
    client = env.client
    vehicle = env.vehicle
    spec = env.camera_specs[0]
    lighting = env.appearance.lighting

    # Camera poses along the env's own trajectory, so bare rendering sees the same scenes.
    poses = []
    env.reset(seed=0)
    for _ in range(steps):
        env.step(np.array([env.expert_command()], np.float32))
        poses.append(body_camera_matrices(client, spec, *vehicle.base_state(), vehicle.params.wheel_radius))

    def render_only(n):
        for view, projection in poses[:n]:
            render(client, spec.width, spec.height, view, projection, lighting)

    def physics_only(n):
        for _ in range(n):
            vehicle.step_physics(env.substeps)

    def env_steps(n):
        for _ in range(n):
            env.step(np.array([env.expert_command()], np.float32))

    results = {"render_fps": [], "physics_steps_per_s": [], "env_steps_per_s": []}
    for _ in range(repeats):
        env.reset(seed=0)
        results["render_fps"].append(_median_rate(render_only, steps, 1))
        env.reset(seed=0)
        results["physics_steps_per_s"].append(_median_rate(physics_only, steps, 1))
        env.reset(seed=0)
        results["env_steps_per_s"].append(_median_rate(env_steps, steps, 1))
    env.close()
    med = {key: statistics.median(values) for key, values in results.items()}
    render_plus_physics = 1.0 / (1.0 / med["render_fps"] + 1.0 / med["physics_steps_per_s"])
    return {
        "resolution": list(resolution),
        "steps_per_repeat": steps,
        "repeats": repeats,
        "physics_substeps_per_step": env.substeps,
        **{key: round(value, 1) for key, value in med.items()},
        "render_plus_physics_steps_per_s": round(render_plus_physics, 1),
        "env_overhead_ratio": round(render_plus_physics / med["env_steps_per_s"], 3),
        "target_env_overhead_ratio_max": 1.15,
    }


def format_table(title: str, rows: dict) -> str:
    """A two-column plain-text table of a bench result."""
    width = max(len(k) for k in rows)
    lines = [title, "-" * (width + 16)]
    lines += [f"{key:<{width}}  {value}" for key, value in rows.items()]
    return "\n".join(lines)
