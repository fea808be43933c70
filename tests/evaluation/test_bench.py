"""``steerloop bench scale``: local and Ray evaluation throughput measured side by side."""

from __future__ import annotations

import numpy as np
import pytest

from steerloop.evaluation.bench import bench_scale


@pytest.mark.slow  # ~15 s: Ray plus three timed runs; `steerloop bench scale` is the measurement itself
def test_bench_scale_measures_every_backend_with_identical_results(ray_local):
    result = bench_scale(scenarios=2, track_length=40.0, repeats=1, progress=False)
    for key in ("local_w1_steps_per_s", "local_w2_steps_per_s", "ray_w2_steps_per_s"):
        assert result[key] > 0, key
    assert result["identical_metrics"] is True
    ray, local = result["ray_w2_steps_per_s"], result["local_w2_steps_per_s"]
    # The rates are printed to 0.1 steps/s: on a loaded machine (a few steps/s) that rounding
    # alone moves the ratio recomputed from them by up to 0.05/local + 0.05*ray/local**2.
    rounding = 0.05 / local + 0.05 * ray / local**2 + 0.0005
    assert result["ray_overhead_vs_local_w2"] == pytest.approx(1 - ray / local, abs=rounding)
    assert ray_local.is_initialized()  # an instance it did not start is left running


@pytest.mark.slow  # ~11 s: three closed-loop runs and a replay; `steerloop bench eval` is the measurement itself
def test_bench_eval_replays_the_closed_loop_drive_and_reports_both_targets():
    from steerloop.evaluation.bench import bench_eval

    result = bench_eval(scenarios=2, track_length=40.0, repeats=1, progress=False)
    for key in ("env_steps_per_s", "closed_loop_w1_steps_per_s", "closed_loop_w2_steps_per_s"):
        assert result[key] > 0, key
    assert result["identical_metrics"] is True and result["replay_reproduces_drive"] is True
    assert result["closed_loop_over_env_ratio"] == pytest.approx(
        result["closed_loop_w1_steps_per_s"] / result["env_steps_per_s"], abs=0.002)
    assert result["batch"] == 4 and result["closed_loop_steps"] > 0


def test_bench_stateful_step_reports_step_and_window_for_the_new_models():
    from steerloop.evaluation.bench import STATEFUL_MODELS, bench_stateful_step

    result = bench_stateful_step(repeats=1, resolution=(20, 40))
    for arch, seq_len in STATEFUL_MODELS.items():
        assert result[f"{arch}_seq_len"] == seq_len
        assert result[f"{arch}_step_ms"] > 0 and result[f"{arch}_window_ms"] > 0
        assert result[f"{arch}_step_speedup_over_window"] > 0


def test_bench_env_renders_bare_frames_from_the_env_s_own_camera_pose_on_a_graded_road():
    """On a graded road the simulated car drives on a level plane out of sight; the bare render
    must replay the pose the env renders from (the car mapped onto the road), not the plane's."""
    from steerloop.evaluation.bench import _ConditionBench
    from steerloop.sim.camera import render

    bench = _ConditionBench("mountain.noon", 20, (16, 32))  # ideal camera: the env's frame is the bare render
    try:
        env = bench.env
        bare = render(env.client, 32, 16, *bench.poses[-1], env.appearance.lighting)
        assert np.array_equal(bare, env.frames[env.episode_cameras[0].name])
    finally:
        bench.env.close()


@pytest.mark.parametrize("condition", ["flat", "mountain.noon"])
def test_bench_env_bare_physics_drives_the_car_as_the_env_does(condition):
    """Bare physics replays the drive's commands (and a graded road's gravity) through the vehicle
    model: a coasting car costs PyBullet about half as much, so it must end where the env's car does."""
    from steerloop.evaluation.bench import _ConditionBench

    bench = _ConditionBench(condition, 30, (16, 32))
    try:
        env = bench.env
        env.reset(seed=0)
        bench.env_steps(30)
        driven = env.vehicle.pose()
        env.reset(seed=0)
        bench.physics_only(30)
        env.vehicle.refresh()
        assert env.vehicle.pose() == driven
        assert env.vehicle.forward_speed() > 0.9 * env.config.speed  # cruise control held the speed
    finally:
        env.close()


def test_bench_env_bare_render_shows_the_moving_cars_where_the_env_showed_them():
    """The scene of each replayed camera pose includes the oncoming cars at that step's places."""
    from steerloop.evaluation.bench import _ConditionBench

    bench = _ConditionBench("town-traffic.noon.ideal", 20, (16, 32))
    try:
        env, first, last = bench.env, bench.traffic[0], bench.traffic[-1]
        assert first and [body for body, *_ in first] == [body for body, *_ in last]
        assert any(a[1] != b[1] for a, b in zip(first, last))  # the cars moved during the drive
        env.reset(seed=0)
        bench.render_only(20)
        assert [(body, *env.client.getBasePositionAndOrientation(body)) for body, *_ in last] == last
    finally:
        bench.env.close()
