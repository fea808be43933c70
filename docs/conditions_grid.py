"""Regenerate docs/conditions_grid.png and docs/scenery_chase.png (README pictures).

Run: ``.venv/bin/python docs/conditions_grid.py``. Camera views of every named condition
(132x400 px, seed 0, 6 s into a test track) and one chase view per scenery value.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from steerloop.sim.conditions import BUILTIN, CONDITIONS, SCENERY
from steerloop.sim.env import LaneKeepEnv

TRACK = 200_003  # a test-split track with a bend ahead
STEPS = 120  # [control steps] 6 s into the route
HERE = Path(__file__).parent


def _drive(env, condition: str) -> None:
    _, info = env.reset(seed=0, options={"condition": condition})
    for _ in range(STEPS):
        _, _, _, _, info = env.step(np.array([info["expert_steering"]], np.float32))


def _label(image: np.ndarray, text: str) -> np.ndarray:
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    cv2.putText(out, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.zeros_like(tiles[0])
    tiles = tiles + [blank] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)


def main() -> None:
    env = LaneKeepEnv(track=TRACK, resolution=(132, 400), render_mode="rgb_array")
    try:
        tiles = []
        for name in BUILTIN.names():
            _drive(env, name)
            tiles.append(_label(env.frames[env.camera_specs[0].name], f"{name} ({BUILTIN.split(name)})"))
        cv2.imwrite(str(HERE / "conditions_grid.png"), _grid(tiles, 3))
        chase = []
        for scenery in SCENERY:
            _drive(env, f"{scenery}.noon.ideal")
            chase.append(_label(env.render(), scenery))
        cv2.imwrite(str(HERE / "scenery_chase.png"), _grid(chase, 4))
    finally:
        env.close()
    print("wrote", HERE / "conditions_grid.png", "and", HERE / "scenery_chase.png", f"({len(CONDITIONS)} conditions)")


if __name__ == "__main__":
    main()
