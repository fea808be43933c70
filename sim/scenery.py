"""Roadside scenery and road-surface detail, placed procedurally from the track and scenery name.

Every object of one material (leaves, trunks, poles, walls, roofs, cars...) is merged into
one mesh, so a whole roadside costs a handful of bodies: the tiny renderer's per-body
overhead, not its triangle count, dominates at 66x200. Objects are low-poly (pyramids and
boxes sharing their corner vertices, with outward-leaning normals so the sun shades them)
to keep the per-vertex memory PyBullet holds small.

Placement is a fixed function of (track name, scenery name): the same track always has the
same trees, in every process, whatever the episode seed.
"""

from __future__ import annotations

import zlib

import numpy as np

from steerloop.sim.conditions import Scenery
from steerloop.sim.track import Track

GROUND_Z = -0.03  # [m] (sim.scene.GROUND_Z)
PATCH_Z = 0.005  # [m] patches lie between the asphalt (0) and the paint (0.01)
VERGE_Z = -0.015  # [m] verges lie between the ground and the asphalt
CLEARANCE = 1.5  # [m] free space between the road's edge and any object
SINK = 0.15  # [m] on graded ground objects stand this far into it, so no base floats on a slope
CENTRE_STEP = 2.0  # [m] spacing of the centre-line points objects are kept away from
Mesh = tuple[np.ndarray, np.ndarray, np.ndarray]  # vertices (N, 3), triangles (M, 3), normals (N, 3)


def _rng(track: Track, scenery_name: str, what: str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(track.name.encode()), zlib.crc32(scenery_name.encode()),
                                  zlib.crc32(what.encode())])


def _normals(vertices: np.ndarray, centre: np.ndarray, lean: float = 1.0) -> np.ndarray:
    """Unit normals pointing away from the object's vertical axis and up by ``lean``."""
    out = vertices - centre
    out[:, 2] = lean * np.maximum(np.abs(out[:, :2]).max(axis=1), 0.1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def box(cx: float, cy: float, z0: float, sx: float, sy: float, sz: float, yaw: float) -> Mesh:
    """A box (no bottom face) of size (sx, sy, sz) standing at (cx, cy, z0), turned by ``yaw``."""
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [sx / 2, sy / 2]
    xy = local @ np.array([[c, s], [-s, c]]) + [cx, cy]
    vertices = np.r_[np.c_[xy, np.full(4, z0)], np.c_[xy, np.full(4, z0 + sz)]]
    sides = [[k, (k + 1) % 4, 4 + (k + 1) % 4, k, 4 + (k + 1) % 4, 4 + k] for k in range(4)]
    triangles = np.array([t for side in sides for t in (side[:3], side[3:])] + [[4, 5, 6], [4, 6, 7]])
    return vertices, triangles, _normals(vertices, np.array([cx, cy, z0 + sz / 2]), lean=0.6)


def pyramid(cx: float, cy: float, z0: float, radius: float, height: float, yaw: float) -> Mesh:
    """A four-sided pyramid (a conifer's crown, a bush)."""
    angles = yaw + np.arange(4) * np.pi / 2
    base = np.c_[cx + radius * np.cos(angles), cy + radius * np.sin(angles), np.full(4, z0)]
    vertices = np.r_[base, [[cx, cy, z0 + height]]]
    triangles = np.array([[k, (k + 1) % 4, 4] for k in range(4)])
    normals = _normals(vertices, np.array([cx, cy, z0]), lean=radius / height + 0.3)
    normals[4] = (0.0, 0.0, 1.0)
    return vertices, triangles, normals


def merge(meshes: list[Mesh]) -> Mesh | None:
    """One mesh from many (indices shifted)."""
    if not meshes:
        return None
    offsets = np.cumsum([0] + [len(m[0]) for m in meshes[:-1]])
    return (np.concatenate([m[0] for m in meshes]), np.concatenate([m[1] + o for m, o in zip(meshes, offsets)]),
            np.concatenate([m[2] for m in meshes]))


def _spots(track: Track, rng: np.random.Generator, per_100m: float, sides: tuple[float, ...],
           near: float, far: float) -> list[tuple[float, float, float, float]]:
    """(x, y, side, heading) of objects: ``per_100m`` per side on average, ``near``-``far`` m
    beyond the road's edge on each side in ``sides`` (+1 left, -1 right)."""
    lane = track.lane_width
    spots = []
    for side in sides:
        count = rng.poisson(per_100m * track.length / 100.0)
        s = np.sort(rng.uniform(0.0, track.length, count))
        depth = rng.uniform(near, far, count)
        edge = 1.5 * lane if side > 0 else -0.5 * lane
        x, y = track.lateral_points(s, edge + side * depth)
        heading = track.pose(s)[2]
        spots += [(float(a), float(b), side, float(h)) for a, b, h in zip(x, y, heading)]
    return spots


def _clear_of_road(track: Track, spots, radius: float) -> list:
    """The spots whose footprint (``radius``) stays ``CLEARANCE`` clear of the road everywhere
    (a curve coming back must not run through a tree)."""
    if not spots:
        return []
    lane = track.lane_width
    s = np.append(np.arange(0.0, track.length, CENTRE_STEP), track.length)
    mx, my = track.lateral_points(s, lane / 2)  # the middle of the two-lane road
    points = np.asarray([(x, y) for x, y, _, _ in spots])
    distance = np.sqrt(((points[:, None, 0] - mx) ** 2 + (points[:, None, 1] - my) ** 2).min(axis=1))
    half_road = lane + 0.6  # [m] half the asphalt width (lanes + shoulder)
    return [spot for spot, d in zip(spots, distance) if d > half_road + CLEARANCE + radius]


def _flat(x, y) -> np.ndarray:
    """The ground's height [m] where nothing is graded (the plane, ``GROUND_Z``)."""
    return np.full(np.shape(x), GROUND_Z)


def _standing(spots, ground, radius: float = 0.0) -> list[tuple[float, float, float, float, float]]:
    """``spots`` with the height [m] their object stands at: the ground under its centre or, with
    ``radius``, the lowest ground under its footprint's corners (no corner floats), sunk by
    ``SINK`` on graded ground (on the plane: exactly ``GROUND_Z``, as before elevation)."""
    if not spots:
        return []
    x, y = np.array([spot[0] for spot in spots]), np.array([spot[1] for spot in spots])
    if ground is _flat:
        return [(*spot[:2], GROUND_Z, *spot[2:]) for spot in spots]
    corners = np.array([[0.0, 0.0]] + ([[-1, -1], [1, -1], [1, 1], [-1, 1]] if radius else [])) * radius
    heights = ground(x[:, None] + corners[:, 0], y[:, None] + corners[:, 1]).min(axis=1) - SINK
    return [(*spot[:2], float(z), *spot[2:]) for spot, z in zip(spots, heights)]


def object_meshes(track: Track, scenery: Scenery, name: str, ground=None) -> dict[str, Mesh]:
    """Merged meshes of the roadside objects of ``scenery`` along ``track``, by material role.

    ``ground(x, y)``: a graded road's ground height [m] (vectorised,
    :meth:`~steerloop.sim.track.elevation.Elevation.ground`); its terrain is drawn ``GROUND_Z``
    below that and objects stand ``SINK`` lower still. None: the level ground plane."""
    ground = _flat if ground is None else _terrain(ground)
    parts: dict[str, list[Mesh]] = {}

    def add(role: str, mesh: Mesh) -> None:
        parts.setdefault(role, []).append(mesh)

    if scenery.trees:
        rng = _rng(track, name, "trees")
        spots = _clear_of_road(track, _spots(track, rng, scenery.trees, (1.0, -1.0), 2.0, 25.0), 2.0)
        for x, y, z, _, h in _standing(spots, ground):
            height = rng.uniform(5.0, 11.0)
            add("trunk", box(x, y, z, 0.35, 0.35, height * 0.35, h))
            add("foliage", pyramid(x, y, z + height * 0.25, rng.uniform(1.2, 2.2), height * 0.75, h))
    if scenery.bushes:
        rng = _rng(track, name, "bushes")
        spots = _clear_of_road(track, _spots(track, rng, scenery.bushes, (1.0, -1.0), 0.5, 12.0), 1.0)
        for x, y, z, _, h in _standing(spots, ground, 0.7):
            add("foliage", pyramid(x, y, z, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.4), h + 0.4))
    if scenery.poles:
        rng = _rng(track, name, "poles")
        for x, y, z, _, h in _standing(_clear_of_road(track, _spots(track, rng, scenery.poles, (1.0,), 1.5, 2.5), 0.2),
                                       ground):
            add("pole", box(x, y, z, 0.25, 0.25, 8.0, h))
    if scenery.posts:
        rng = _rng(track, name, "posts")
        spots = _clear_of_road(track, _spots(track, rng, scenery.posts, (1.0, -1.0), 0.3, 0.8), 0.0)
        for x, y, z, side, h in _standing(spots, ground):
            add("post", box(x, y, z, 0.12, 0.12, 1.1, h))
            if rng.uniform() < 0.3:  # a sign board on some posts
                add("post", box(x, y, z + 1.6, 0.08, 0.7, 0.7, h))
                add("pole", box(x, y, z, 0.08, 0.08, 1.6, h))
    if scenery.fences:
        add_fences(track, scenery, name, add, ground)
    if scenery.buildings:
        rng = _rng(track, name, "buildings")
        spots = _clear_of_road(track, _spots(track, rng, scenery.buildings, (1.0, -1.0), 5.0, 22.0), 6.0)
        for x, y, z, _, h in _standing(spots, ground, 6.0):
            sx, sy, sz = rng.uniform(6.0, 12.0), rng.uniform(6.0, 10.0), rng.uniform(3.0, 12.0)
            add("building", box(x, y, z, sx, sy, sz, h))
            add("roof", pyramid(x, y, z + sz, 0.7 * max(sx, sy), rng.uniform(1.0, 3.0), h + np.pi / 4))
    if scenery.parked_cars:
        rng = _rng(track, name, "parked_cars")
        lane = track.lane_width
        count = rng.poisson(scenery.parked_cars * track.length / 100.0)
        s = np.sort(rng.uniform(10.0, max(track.length - 10.0, 10.0), count))
        x, y = track.lateral_points(s, -0.5 * lane - 0.6 - 1.2)  # beyond the right shoulder
        spots = [(float(a), float(b), float(h)) for a, b, h in zip(x, y, track.pose(s)[2])]
        for a, b, z, h in _standing(spots, ground, 2.2):
            add("car", box(a, b, z + 0.25, 4.4, 1.8, 0.8, h))
            add("car", box(a, b, z + 1.05, 2.4, 1.6, 0.5, h))
    return {role: merge(meshes) for role, meshes in parts.items()}


def _terrain(ground):
    """Object heights from a graded road's ground function: on the terrain, which is drawn
    ``GROUND_Z`` below it (sim.scene.terrain_mesh)."""
    def height(x, y):
        return ground(x, y) + GROUND_Z
    return height


def add_fences(track: Track, scenery: Scenery, name: str, add, ground=_flat) -> None:
    """Fence/guard-rail runs on the right, covering about ``scenery.fences`` of the route."""
    rng = _rng(track, name, "fences")
    run = 40.0  # [m] length of one run
    starts = np.arange(0.0, max(track.length - run, 0.0), run)
    lateral = -0.5 * track.lane_width - 0.6 - 1.0
    for start in starts[rng.uniform(size=len(starts)) < scenery.fences]:
        s = np.arange(start, start + run, 4.0)
        x, y = track.lateral_points(s, lateral)
        heading = track.pose(s)[2]
        spots = [(float(a), float(b), float(h)) for a, b, h in zip(x, y, heading)]
        for a, b, z, h in _standing(spots, ground):
            add("fence", box(a, b, z, 0.12, 0.12, 0.9, h))
            add("fence", box(float(a + 2.0 * np.cos(h)), float(b + 2.0 * np.sin(h)), z + 0.55, 4.0, 0.08, 0.3, h))
