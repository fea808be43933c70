"""Plain helpers shared by the tests (constants and functions; fixtures live in conftest.py).

Import them with ``from helpers import TINY, SHORT_SPEC``: pytest puts tests/ on sys.path."""

from __future__ import annotations

import numpy as np

TINY = (16, 32)  # (H, W) [px]: the smallest images worth rendering; keeps every test fast

# 40 m straight + 25 m radius, 60 deg left arc + 20 m straight: ~76 m of route, ~150 steps at 10 m/s.
SHORT_SPEC = {
    "name": "short",
    "lane_width": 3.7,
    "segments": [
        {"type": "straight", "length": 40},
        {"type": "arc", "radius": 25, "angle": 60},
        {"type": "straight", "length": 20},
    ],
}


def straight_spec(length: float = 150.0) -> dict:
    """A single straight of ``length`` metres (clean geometry for perturbation checks)."""
    return {"name": f"straight-{length:g}", "lane_width": 3.7, "segments": [{"type": "straight", "length": length}]}


def drive_with_expert_label(env, *, seed: int = 0, options: dict | None = None, max_steps: int = 5000):
    """Drive ``env`` with ``info["expert_steering"]`` (no privileged observation needed).

    Returns (last info, list of infos of every step)."""
    _, info = env.reset(seed=seed, options=options)
    infos = []
    for _ in range(max_steps):
        _, _, terminated, truncated, info = env.step(np.array([info["expert_steering"]], np.float32))
        infos.append(info)
        if terminated or truncated:
            break
    return info, infos


def alive(processes: list) -> list:
    """The psutil processes of ``processes`` still running (zombies and vanished ones are not)."""
    import psutil

    running = []
    for process in processes:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def record_short_log(root, episodes: int, **record_fields) -> str:
    """Record ``episodes`` expert episodes on SHORT_SPEC at TINY resolution into ``root/log``
    (``record_fields``: any other RecordConfig field, e.g. DART ``noise``); returns the path."""
    import json

    from steerloop.training.record import RecordConfig, record

    spec = root / "short.json"
    spec.write_text(json.dumps(SHORT_SPEC))
    out = root / "log"
    record(RecordConfig(out=str(out), episodes=episodes, track=str(spec), resolution=TINY, **record_fields),
           progress=False)
    return str(out)
