"""Memory: resets over revisited and over ever-new tracks must not grow a process without bound.

A world keeps the road meshes of at most ``ROADS_PER_WORLD`` tracks and is rebuilt (the
simulation reset, which frees them) before one more; the meshes are passed to PyBullet
without leaving Python objects behind. Revisiting a track, changing condition colours and
reloading the car cost nothing.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pybullet
import pytest
from helpers import TINY

from steerloop.sim import scene
from steerloop.sim.env import LaneKeepEnv
from steerloop.sim.track import split_seed

psutil = pytest.importorskip("psutil")

RESETS = 1000
BASELINE_AFTER = 50
ALLOWED_GROWTH_MB = 50.0
N_TRACKS = 40  # distinct procedural tracks cycled through


@pytest.mark.slow
def test_thousand_resets_do_not_leak():
    process = psutil.Process()
    env = LaneKeepEnv(track_length=150.0, resolution=TINY, cameras=("center", "left", "right"))
    zero = np.zeros(1, np.float32)
    baseline = None
    rss = []
    try:
        for i in range(RESETS):
            env.reset(seed=i, options={"track": split_seed("train", i % N_TRACKS)})
            for _ in range(3):
                env.step(zero)
            env.top_down()
            if i + 1 == BASELINE_AFTER:
                gc.collect()
                baseline = process.memory_info().rss
            if (i + 1) % 100 == 0:
                rss.append(process.memory_info().rss)
    finally:
        env.close()
    gc.collect()
    final = process.memory_info().rss
    growth_mb = (max([final, *rss]) - baseline) / 2 ** 20
    assert growth_mb <= ALLOWED_GROWTH_MB, (
        f"RSS grew {growth_mb:.1f} MB over {RESETS - BASELINE_AFTER} resets "
        f"(every 100 resets, MB: {[round(r / 2 ** 20) for r in rss]})")


def test_road_meshes_leave_no_python_objects_behind():
    """pybullet keeps a reference to every list passed to createVisualShape; the scene passes
    reused holders, so building the roads of new tracks leaves no Python memory behind
    (before: about 0.4 MB per 400 m road)."""
    from pybullet_utils import bullet_client

    from steerloop.sim.scene import build_road_shapes
    from steerloop.sim.track import generate_track

    client = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
    tracks = [generate_track(split_seed("train", i), length=400.0) for i in range(4)]
    try:
        # The reused holders grow once to the largest mesh so far: a longer road fills them first.
        for condition in ("default", "worn"):  # every surface role (default has verges and patches)
            build_road_shapes(client, generate_track(split_seed("train", 99), length=1000.0), condition)
        gc.collect()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for track in tracks:
            for condition in ("default", "worn"):
                build_road_shapes(client, track, condition)
        gc.collect()
        growth_kb = (tracemalloc.get_traced_memory()[0] - start) / 1024
    finally:
        tracemalloc.stop()
        client.disconnect()
    assert growth_kb < 10.0, f"8 roads left {growth_kb:.0f} KB of Python objects behind"


def test_a_full_world_is_rebuilt_and_drives_bit_identically(monkeypatch):
    """After ROADS_PER_WORLD distinct roads the simulation is reset (freeing every mesh); an
    episode after that rebuild is bit-identical to the same episode in a fresh environment."""
    monkeypatch.setattr(scene, "ROADS_PER_WORLD", 2)
    target = split_seed("val", 7)

    def episode(env) -> list:
        obs, info = env.reset(seed=3, options={"track": target})
        out = [(obs["image"].copy(), info["lateral_offset"], info["x"], info["y"], info["yaw"])]
        for _ in range(15):
            obs, _, _, _, info = env.step(np.array([info["expert_steering"] + 0.05], np.float32))
            out.append((obs["image"].copy(), info["lateral_offset"], info["x"], info["y"], info["yaw"]))
        return out

    fresh = LaneKeepEnv(track_length=150.0, resolution=TINY)
    used = LaneKeepEnv(track_length=150.0, resolution=TINY)
    try:
        expected = episode(fresh)
        for index in (1, 2):
            used.reset(seed=index, options={"track": split_seed("train", index)})
        first_world = used.world
        got = episode(used)
        assert used.world is not first_world and len(used.world.road_cache) == 1  # rebuilt, old meshes freed
    finally:
        fresh.close()
        used.close()
    for (image_a, *state_a), (image_b, *state_b) in zip(expected, got):
        assert np.array_equal(image_a, image_b)
        assert state_a == state_b


@pytest.mark.slow
def test_a_thousand_distinct_tracks_grow_rss_by_at_most_50_mb():
    """Every reset on a new procedural track (as ``track=None`` RL runs do): RSS after 1,000
    distinct 400 m tracks stays within 50 MB of the baseline (before: ~0.4 MB per track)."""
    from steerloop.evaluation.bench import SOAK_ALLOWED_GROWTH_MB, bench_soak

    result = bench_soak(tracks=1000, resolution=TINY)
    assert result["rss_growth_mb"] <= SOAK_ALLOWED_GROWTH_MB, result
