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

import threading
import zlib
from dataclasses import dataclass

import numpy as np
import pybullet as p

from steerloop.sim.camera import Lighting
from steerloop.sim.track import WORLD_REACH, Track

MESH_STEP = 1.0  # [m] resolution at which cross-sections are chosen
MESH_MAX_TURN = 0.05  # [rad] heading change between road cross-sections (chord error < 2 cm at 8 m width)
MESH_MAX_STEP = 25.0  # [m] longest distance between cross-sections on a straight
LINE_WIDTH = 0.15  # [m] painted line width
SHOULDER = 0.6  # [m] asphalt beyond the edge lines
DASH_LENGTH = 3.0  # [m]
DASH_PERIOD = 9.0  # [m] dash + gap
WORLD_HALF_SIZE = 3000.0  # [m] the ground and sky box span [-3 km, 3 km] around the origin
GROUND_MARGIN = WORLD_HALF_SIZE - WORLD_REACH  # [m] (600) roads stay this far inside the ground so the horizon looks right
SKY_HEIGHT = 150.0  # [m]
ROAD_Z, LINE_Z, GROUND_Z = 0.0, 0.01, -0.03  # [m] layer heights (avoid z-fighting)
# PyBullet frees visual shapes only when the whole simulation is reset, so a world keeps the
# road meshes of at most this many (track, condition) pairs (about 0.1 MB each for 400 m);
# the environment rebuilds its world before showing one more.
ROADS_PER_WORLD = 128


@dataclass(frozen=True)
class Appearance:
    """A concrete look of the scene, drawn from a condition."""

    asphalt: tuple[float, float, float]
    ground: tuple[float, float, float]
    sky: tuple[float, float, float]
    edge_line: tuple[float, float, float]
    centre_line: tuple[float, float, float]
    lighting: Lighting


# name -> base colours (jittered per reset), fraction of line pieces kept (worn markings), lighting
CONDITIONS = {
    "default": dict(asphalt=(0.33, 0.33, 0.35), ground=(0.30, 0.52, 0.22), sky=(0.55, 0.72, 0.95),
                    edge=(0.95, 0.95, 0.95), centre=(0.95, 0.95, 0.95), keep=1.0,
                    light=Lighting()),
    "dusk": dict(asphalt=(0.30, 0.28, 0.32), ground=(0.28, 0.36, 0.22), sky=(0.98, 0.62, 0.45),
                 edge=(0.90, 0.86, 0.78), centre=(0.90, 0.86, 0.78), keep=1.0,
                 light=Lighting(direction=(1.0, 0.2, 0.25), color=(1.0, 0.78, 0.62), ambient=0.55, diffuse=0.35)),
    "worn": dict(asphalt=(0.38, 0.37, 0.36), ground=(0.36, 0.50, 0.25), sky=(0.60, 0.70, 0.85),
                 edge=(0.70, 0.70, 0.66), centre=(0.70, 0.70, 0.66), keep=0.55,
                 light=Lighting(ambient=0.65, diffuse=0.4)),
    "desert": dict(asphalt=(0.25, 0.24, 0.24), ground=(0.80, 0.68, 0.48), sky=(0.70, 0.82, 0.98),
                   edge=(0.95, 0.95, 0.90), centre=(0.95, 0.80, 0.20), keep=1.0,
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
                      edge_line=jitter(c["edge"]), centre_line=jitter(c["centre"]), lighting=c["light"])


def _sections(track: Track) -> np.ndarray:
    """Arc lengths of road cross-sections: dense where the road bends, sparse on straights.

    PyBullet keeps about 100-200 bytes per mesh vertex for the life of the process (even
    across ``resetSimulation``), so the mesh uses as few vertices as the curvature allows.
    """
    fine = np.append(np.arange(0.0, track.length, MESH_STEP), track.length)
    heading = track.pose(fine)[2]
    turn = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(heading)))])
    chosen, last_s, last_turn = [0.0], 0.0, 0.0
    for s, t in zip(fine[1:-1], turn[1:-1]):
        if t - last_turn >= MESH_MAX_TURN or s - last_s >= MESH_MAX_STEP:
            chosen.append(s)
            last_s, last_turn = s, t
    chosen.append(track.length)
    return np.asarray(chosen)


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


def _pieces(track: Track, sections: np.ndarray, starts: np.ndarray, length: float, left: float, right: float,
            z: float):
    """Many short ribbons (dashes, worn line pieces) merged into one mesh."""
    vertices, triangles, count = [], [], 0
    for start in starts:
        end = min(start + length, track.length)
        inner = sections[(sections > start) & (sections < end)]
        v, t = _strip(track, np.concatenate([[start], inner, [end]]), left, right, z)
        triangles.append(t + count)
        vertices.append(v)
        count += len(v)
    if not vertices:
        return None, None
    return np.concatenate(vertices), np.concatenate(triangles)


# pybullet's createVisualShape never releases the references it takes to the ``vertices``,
# ``normals`` and ``indices`` lists and to every vertex and normal in them (extractVertices
# and extractIndices in pybullet.c call PySequence_Fast / PySequence_GetItem without
# Py_DECREF), so whatever Python objects are passed there live for the rest of the process:
# about 0.5 KB per vertex, 0.4 MB per 400 m road. Meshes are therefore passed through lists
# and [x, y, z] holders reused for every mesh of the process: the same few objects gain
# references, the coordinates they hold are replaced (the same float values).
_VERTEX_SLOTS: list[list[float]] = []  # [x, y, z] holders, grown to the largest mesh so far
_UP = [0.0, 0.0, 1.0]  # the one normal of every mesh
_ORIGIN = (0.0, 0.0, 0.0)  # what the holders hold between meshes
_MESH_ARGS: tuple[list, list, list] = ([], [], [])  # the vertices, normals and indices passed to pybullet
_MESH_LOCK = threading.Lock()  # the holders are shared by every client of the process


def _mesh_shape(client, vertices, triangles, double_sided=False) -> int:
    if double_sided:
        triangles = np.concatenate([triangles, triangles[:, ::-1]])
    vertex_arg, normal_arg, index_arg = _MESH_ARGS
    with _MESH_LOCK:
        while len(_VERTEX_SLOTS) < len(vertices):
            _VERTEX_SLOTS.append(list(_ORIGIN))
        for slot, row in zip(_VERTEX_SLOTS, vertices.tolist()):
            slot[:] = row
        vertex_arg[:] = _VERTEX_SLOTS[:len(vertices)]
        # All normals point up: the sky and ground are shaded uniformly whatever the light direction.
        normal_arg[:] = [_UP] * len(vertices)
        index_arg[:] = triangles.reshape(-1).tolist()
        try:
            return client.createVisualShape(p.GEOM_MESH, vertices=vertex_arg, indices=index_arg,
                                            normals=normal_arg, rgbaColor=[1.0, 1.0, 1.0, 1.0])
        finally:  # keep nothing of this mesh alive
            for slot in vertex_arg:
                slot[:] = _ORIGIN
            for arg in _MESH_ARGS:
                arg.clear()


def _body(client, shape: int, collision: int = -1) -> int:
    return client.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, baseCollisionShapeIndex=collision)


def marking_keep(condition: str) -> float:
    """Fraction of painted line pieces that survive in ``condition`` (< 1: worn markings)."""
    return float(CONDITIONS[condition]["keep"])


@dataclass(frozen=True)
class RoadShapes:
    """Visual shape ids of one track's road under one condition's wear (built once per process)."""

    asphalt: int
    edge_lines: tuple[int, ...]
    centre_line: int | None


def build_road_shapes(client, track: Track, condition: str) -> RoadShapes:
    """Meshes of the road surface and markings of ``track`` as worn under ``condition``.

    Which line pieces are worn away is a fixed function of the track and the condition,
    so the shapes can be reused for every episode on that track.
    """
    keep_fraction = marking_keep(condition)
    wear = np.random.default_rng([zlib.crc32(track.name.encode()), zlib.crc32(condition.encode())])
    lane = track.lane_width
    right_edge, left_edge = -lane / 2, 1.5 * lane  # [m] road edges relative to the ego-lane centre
    sections = _sections(track)
    asphalt = _mesh_shape(client, *_strip(track, sections, left_edge + SHOULDER, right_edge - SHOULDER, ROAD_Z))
    edge_lines = []
    for edge, inward in ((right_edge, 1.0), (left_edge, -1.0)):
        left, right = max(edge, edge + inward * LINE_WIDTH), min(edge, edge + inward * LINE_WIDTH)
        if keep_fraction >= 1.0:
            v, t = _strip(track, sections, left, right, LINE_Z)
        else:  # worn: 3 m pieces, some of them missing
            starts = np.arange(0.0, track.length, DASH_LENGTH)
            v, t = _pieces(track, sections, starts[wear.uniform(size=len(starts)) < keep_fraction], DASH_LENGTH,
                           left, right, LINE_Z)
        if v is not None:
            edge_lines.append(_mesh_shape(client, v, t))
    dash_starts = np.arange(0.0, track.length, DASH_PERIOD)
    dash_starts = dash_starts[wear.uniform(size=len(dash_starts)) < keep_fraction]
    v, t = _pieces(track, sections, dash_starts, DASH_LENGTH, lane / 2 + LINE_WIDTH / 2, lane / 2 - LINE_WIDTH / 2,
                   LINE_Z)
    centre_line = _mesh_shape(client, v, t) if v is not None else None
    return RoadShapes(asphalt=asphalt, edge_lines=tuple(edge_lines), centre_line=centre_line)


class World:
    """The static world of one PyBullet client: ground plane and sky box (built once), and
    the road of the current track.

    PyBullet frees shapes only on ``resetSimulation``, so road meshes are built once per
    distinct (track, condition) and kept in ``road_cache``; switching tracks only removes
    and re-creates the road's bodies from cached shapes. A world holds at most
    ``ROADS_PER_WORLD`` roads (:meth:`is_full_for`); then its owner resets the simulation
    and builds a new world, which frees them all.
    """

    def __init__(self, client):
        self.client = client
        half = WORLD_HALF_SIZE
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
        ground_shape = _mesh_shape(client, np.c_[corners, np.full(4, GROUND_Z)], np.array([[0, 1, 2], [0, 2, 3]]))
        self.ground = _body(client, ground_shape, collision=client.createCollisionShape(p.GEOM_PLANE))
        client.changeDynamics(self.ground, -1, lateralFriction=1.0, rollingFriction=0.0, spinningFriction=0.0)
        sky_vertices = np.concatenate([np.c_[corners, np.full(4, SKY_HEIGHT)],
                                       np.c_[corners, np.full(4, GROUND_Z - 1.0)]])
        walls = [[k, (k + 1) % 4, 4 + (k + 1) % 4, k, 4 + (k + 1) % 4, 4 + k] for k in range(4)]
        sky_triangles = np.array([[0, 1, 2], [0, 2, 3]] + [w[:3] for w in walls] + [w[3:] for w in walls])
        self.sky = _body(client, _mesh_shape(client, sky_vertices, sky_triangles, double_sided=True))
        self.road_cache: dict[tuple[str, str], RoadShapes] = {}
        self.road_key: tuple[str, str] | None = None
        self.road_bodies: dict[str, list[int]] = {}

    def is_full_for(self, track_key: str, condition: str) -> bool:
        """Whether showing this road would build more than ``ROADS_PER_WORLD`` roads' meshes."""
        return (track_key, condition) not in self.road_cache and len(self.road_cache) >= ROADS_PER_WORLD

    def show(self, track: Track, track_key: str, condition: str) -> None:
        """Make the road of ``track`` (identified by ``track_key``) under ``condition`` visible."""
        extent = max(np.abs(track.x).max(), np.abs(track.y).max())
        if extent > WORLD_REACH:
            raise ValueError(
                f"track {track.name!r} reaches {extent:.0f} m from the origin; the world is "
                f"{WORLD_REACH:.0f} m across from the centre: move its start or shorten it")
        key = (track_key, condition)
        if key == self.road_key:
            return
        for bodies in self.road_bodies.values():
            for body in bodies:
                self.client.removeBody(body)
        if key not in self.road_cache:
            self.road_cache[key] = build_road_shapes(self.client, track, condition)
        shapes = self.road_cache[key]
        self.road_bodies = {
            "asphalt": [_body(self.client, shapes.asphalt)],
            "edge_line": [_body(self.client, shape) for shape in shapes.edge_lines],
            "centre_line": [] if shapes.centre_line is None else [_body(self.client, shapes.centre_line)],
        }
        self.road_key = key

    def paint(self, appearance: Appearance) -> None:
        """Colour everything with ``appearance`` (no new geometry is created)."""
        paint = [(self.ground, appearance.ground), (self.sky, appearance.sky)]
        for role, bodies in self.road_bodies.items():
            paint += [(body, getattr(appearance, role)) for body in bodies]
        for body, colour in paint:
            self.client.changeVisualShape(body, -1, rgbaColor=[*colour, 1.0])
