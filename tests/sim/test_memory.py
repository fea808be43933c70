"""Memory soak: 1,000 resets cycling over 40 tracks (a track change at every reset) must not leak.

PyBullet keeps every mesh it was given for the life of the process, so each *distinct*
track costs its road mesh once (about 0.3 MB for 400 m); revisiting a track, changing
condition colours and reloading the car must cost nothing.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from helpers import TINY

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
