"""The visible world built from a track: road meshes, ground, sky, lighting conditions.

The road is a two-lane road. The car drives in the right-hand lane, whose centre is the
track's centre line; a dashed line separates it from the oncoming lane on the left and
solid edge lines bound the road. Each surface is one triangle mesh built once per track
(a few hundred vertices), not thousands of boxes, so the tiny renderer stays fast.

A *condition* names a distribution over appearances (colours, marking wear, light);
:func:`draw_appearance` samples a concrete :class:`Appearance` from it with the
environment's ``np_random``, so studies can hold whole conditions out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

from sim.camera import Lighting
from sim.track import Track

MESH_STEP = 1.0  # [m] spacing of road cross-sections along the centre line
LINE_WIDTH = 0.15  # [m] painted line width
SHOULDER = 0.6  # [m] asphalt beyond the edge lines
DASH_LENGTH = 3.0  # [m]
DASH_PERIOD = 9.0  # [m] dash + gap
GROUND_MARGIN = 600.0  # [m] ground extends this far beyond the track's bounding box
SKY_HEIGHT = 120.0  # [m]
ROAD_Z, LINE_Z, GROUND_Z = 0.0, 0.01, -0.03  # [m] layer heights (avoid z-fighting)


@dataclass(frozen=True)
class Appearance:
    """A concrete look of the scene, drawn from a condition."""

    asphalt: tuple[float, float, float]
    ground: tuple[float, float, float]
    sky: tuple[float, float, float]
    edge_line: tuple[float, float, float]
    centre_line: tuple[float, float, float]
    marking_keep: float  # fraction of painted line pieces that survive (worn markings < 1)
    lighting: Lighting


# name -> (base colours, colour jitter, marking_keep range, lighting)
CONDITIONS = {
    "default": dict(asphalt=(0.33, 0.33, 0.35), ground=(0.30, 0.52, 0.22), sky=(0.55, 0.72, 0.95),
                    edge=(0.95, 0.95, 0.95), centre=(0.95, 0.95, 0.95), keep=(1.0, 1.0),
                    light=Lighting()),
    "dusk": dict(asphalt=(0.30, 0.28, 0.32), ground=(0.28, 0.36, 0.22), sky=(0.98, 0.62, 0.45),
                 edge=(0.90, 0.86, 0.78), centre=(0.90, 0.86, 0.78), keep=(1.0, 1.0),
                 light=Lighting(direction=(1.0, 0.2, 0.25), color=(1.0, 0.78, 0.62), ambient=0.55, diffuse=0.35)),
    "worn": dict(asphalt=(0.38, 0.37, 0.36), ground=(0.36, 0.50, 0.25), sky=(0.60, 0.70, 0.85),
                 edge=(0.70, 0.70, 0.66), centre=(0.70, 0.70, 0.66), keep=(0.45, 0.7),
                 light=Lighting(ambient=0.65, diffuse=0.4)),
    "desert": dict(asphalt=(0.25, 0.24, 0.24), ground=(0.80, 0.68, 0.48), sky=(0.70, 0.82, 0.98),
                   edge=(0.95, 0.95, 0.90), centre=(0.95, 0.80, 0.20), keep=(1.0, 1.0),
                   light=Lighting(direction=(0.1, -0.3, 1.0), ambient=0.7, diffuse=0.45)),
}
COLOUR_JITTER = 0.04  # [-] uniform jitter of each colour channel


def draw_appearance(condition: str, np_random: np.random.Generator) -> Appearance:
    """Sample a concrete appearance of ``condition`` (colours jittered, wear drawn)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    c = CONDITIONS[condition]

    def jitter(rgb):
        return tuple(float(v) for v in np.clip(np.asarray(rgb) + np_random.uniform(-1, 1, 3) * COLOUR_JITTER, 0, 1))

    return Appearance(asphalt=jitter(c["asphalt"]), ground=jitter(c["ground"]), sky=c["sky"],
                      edge_line=jitter(c["edge"]), centre_line=jitter(c["centre"]),
                      marking_keep=float(np_random.uniform(*c["keep"])), lighting=c["light"])


def _strip(track: Track, s: np.ndarray, left: float, right: float, z: float):
    """Vertices and triangles of a ribbon between lateral offsets ``right`` < ``left``."""
    xl, yl = track.lateral_points(s, left)
    xr, yr = track.lateral_points(s, right)
    n = len(s)
    vertices = np.empty((2 * n, 3))
    vertices[0::2] = np.c_[xl, yl, np.full(n, z)]
    vertices[1::2] = np.c_[xr, yr, np.full(n, z)]
    i = np.arange(n - 1) * 2
    # Counter-clockwise seen from above: (left_i, right_i, left_i+1), (right_i, right_i+1, left_i+1).
    triangles = np.c_[i, i + 1, i + 2, i + 1, i + 3, i + 2].reshape(-1, 3)
    return vertices, triangles


def _pieces(track: Track, starts: np.ndarray, length: float, left: float, right: float, z: float):
    """Many short ribbons (dashes, worn line pieces) merged into one mesh."""
    vertices, triangles = [], []
    for start in starts:
        s = np.linspace(start, min(start + length, track.length), 3)
        v, t = _strip(track, s, left, right, z)
        triangles.append(t + sum(len(x) for x in vertices))
        vertices.append(v)
    if not vertices:
        return None, None
    return np.concatenate(vertices), np.concatenate(triangles)


def _mesh_body(client, vertices, triangles, colour, double_sided=False, collision=-1) -> int:
    if double_sided:
        triangles = np.concatenate([triangles, triangles[:, ::-1]])
    normals = np.tile([0.0, 0.0, 1.0], (len(vertices), 1))
    shape = client.createVisualShape(p.GEOM_MESH, vertices=vertices.tolist(), indices=triangles.reshape(-1).tolist(),
                                     normals=normals.tolist(), rgbaColor=[*colour, 1.0])
    return client.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, baseCollisionShapeIndex=collision)


def build_scene(client, track: Track, appearance: Appearance, np_random: np.random.Generator) -> list[int]:
    """Create the road, markings, ground (with the collision plane the car drives on) and
    sky of ``track``; returns the body ids.

    ``np_random`` decides which line pieces are worn away when ``marking_keep`` < 1.
    """
    lane = track.lane_width
    right_edge, left_edge = -lane / 2, 1.5 * lane  # [m] road edges relative to the ego-lane centre
    s = np.append(np.arange(0.0, track.length, MESH_STEP), track.length)
    bodies = [_mesh_body(client, *_strip(track, s, left_edge + SHOULDER, right_edge - SHOULDER, ROAD_Z),
                         appearance.asphalt)]

    # Solid edge lines, drawn as 3 m pieces so worn conditions can drop some of them.
    piece_starts = np.arange(0.0, track.length, DASH_LENGTH)
    for edge, inward in ((right_edge, 1.0), (left_edge, -1.0)):
        keep = np_random.uniform(size=len(piece_starts)) < appearance.marking_keep
        v, t = _pieces(track, piece_starts[keep], DASH_LENGTH, max(edge, edge + inward * LINE_WIDTH),
                       min(edge, edge + inward * LINE_WIDTH), LINE_Z)
        if v is not None:
            bodies.append(_mesh_body(client, v, t, appearance.edge_line))
    dash_starts = np.arange(0.0, track.length, DASH_PERIOD)
    keep = np_random.uniform(size=len(dash_starts)) < appearance.marking_keep
    v, t = _pieces(track, dash_starts[keep], DASH_LENGTH, lane / 2 + LINE_WIDTH / 2, lane / 2 - LINE_WIDTH / 2, LINE_Z)
    if v is not None:
        bodies.append(_mesh_body(client, v, t, appearance.centre_line))

    # Ground and a sky box around everything.
    lo = np.array([track.x.min(), track.y.min()]) - GROUND_MARGIN
    hi = np.array([track.x.max(), track.y.max()]) + GROUND_MARGIN
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])
    ground = np.c_[corners, np.full(4, GROUND_Z)]
    bodies.append(_mesh_body(client, ground, np.array([[0, 1, 2], [0, 2, 3]]), appearance.ground,
                             collision=client.createCollisionShape(p.GEOM_PLANE)))
    client.changeDynamics(bodies[-1], -1, lateralFriction=1.0, rollingFriction=0.0, spinningFriction=0.0)
    top = np.c_[corners, np.full(4, SKY_HEIGHT)]
    bottom = np.c_[corners, np.full(4, GROUND_Z - 1.0)]
    sky_vertices = np.concatenate([top, bottom])
    walls = [[k, (k + 1) % 4, 4 + (k + 1) % 4, k, 4 + (k + 1) % 4, 4 + k] for k in range(4)]
    sky_triangles = np.array([[0, 1, 2], [0, 2, 3]] + [w[:3] for w in walls] + [w[3:] for w in walls])
    bodies.append(_mesh_body(client, sky_vertices, sky_triangles, appearance.sky, double_sided=True))
    return bodies
