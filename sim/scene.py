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

import dataclasses
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import pybullet as p

from steerloop.sim import conditions as conditions_model
from steerloop.sim import scenery as scenery_model
from steerloop.sim import traffic as traffic_model
from steerloop.sim.camera import Lighting
from steerloop.sim.track import WORLD_REACH, Track
from steerloop.sim.track import elevation as elevation_model
from steerloop.sim.track.elevation import Elevation

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
PATCH_Z, VERGE_Z = 0.005, -0.015  # [m] patches/kerbs between asphalt and paint; verges below the asphalt
MESH_MAX_PITCH = 0.01  # [rad] grade change between cross-sections of a graded road (crest sag < 3 mm)
MESH_MAX_BANK = 0.01  # [rad] superelevation change between cross-sections of a banked road
# The ground beside a graded road: cross-sections of the terrain at these distances [m] beyond the
# asphalt edge (the first APRON metres level with the edge), faded into the far ground plane
# between TERRAIN_FADE[0] and TERRAIN_FADE[1]; extra cross-sections continue the road's line this
# far [m] beyond both ends so the ground goes on where the asphalt stops.
TERRAIN_COLUMNS = (elevation_model.APRON, 8.0, 18.0, 32.0, 55.0, 85.0)
TERRAIN_FADE = (32.0, 85.0)  # [m] beyond the asphalt edge
TERRAIN_ENDS = (15.0, 35.0, 60.0, elevation_model.EXTENSION)  # [m] beyond each end of the road
TERRAIN_BAND = 3.0  # [m] another stretch of road this close to a cross-section's line cuts it short ...
TERRAIN_KEEP = 1.0  # [m] ... this far before that road's apron
TERRAIN_OWN = 30.0  # [m] road this close along the route is the cross-section's own stretch
FAR_BELOW = 1.0  # [m] the far ground plane lies this far below the lowest point of a graded road's terrain
# PyBullet frees visual shapes only when the whole simulation is reset, so a world keeps the
# road meshes of at most this many (track, condition) pairs (about 0.1 MB each for 400 m);
# the environment rebuilds its world before showing one more.
ROADS_PER_WORLD = 128
# On graded roads the car drives in the road's frame (sim.env.road_frame): on a level plane this
# high [m], above the sky box (so no camera sees the plane or the car's body there) and far above
# the ground plane, which it never touches.
DRIVING_PLANE_Z = 1000.0


@dataclass(frozen=True)
class Appearance:
    """A concrete look of the scene, drawn from a condition."""

    asphalt: tuple[float, float, float]
    ground: tuple[float, float, float]
    sky: tuple[float, float, float]
    edge_line: tuple[float, float, float]
    centre_line: tuple[float, float, float]
    lighting: Lighting
    extra: tuple[tuple[str, tuple[float, float, float]], ...] = ()
    """Colours of the scenery's other surfaces (patches, verges, trees, buildings...) by role."""

    def colour(self, role: str) -> tuple[float, float, float]:
        if role in ROAD_ROLES:
            return getattr(self, role)
        if role == "terrain":  # the ground beside a graded road is the ground
            return self.ground
        return dict(self.extra)[role]


# The classes of observation["semantic"] (extra_observations=("semantic",)), by id.
SEMANTIC_CLASSES = ("sky", "road", "marking", "ground", "scenery", "vehicle")
SKY, ROAD, MARKING, GROUND, SCENERY, VEHICLE = range(len(SEMANTIC_CLASSES))
ROLE_CLASSES = {  # the class of every surface role a road or scenery is built of
    "asphalt": ROAD, "patch": ROAD, "edge_line": MARKING, "centre_line": MARKING, "verge": GROUND, "kerb": GROUND,
    "foliage": SCENERY, "trunk": SCENERY, "pole": SCENERY, "post": SCENERY, "fence": SCENERY, "building": SCENERY,
    "roof": SCENERY, "car": VEHICLE, "terrain": GROUND,
}

# The built-in named conditions (see sim.conditions); kept here for the modules that list them.
CONDITIONS = conditions_model.CONDITIONS
COLOUR_JITTER = 0.04  # [-] uniform jitter of each colour channel
SHADE_JITTER = 0.15  # [-] relative brightness jitter of the scenery's other surfaces
ROAD_ROLES = ("asphalt", "edge_line", "centre_line")
FIXED_COLOURS = {  # roles whose colour no axis sets
    "trunk": (0.36, 0.26, 0.16), "pole": (0.42, 0.36, 0.30), "post": (0.92, 0.92, 0.90),
    "kerb": (0.78, 0.78, 0.76), "roof": (0.42, 0.20, 0.17), "car": (0.55, 0.12, 0.12), "fence": (0.70, 0.70, 0.72),
}


def draw_appearance(condition: str, np_random: np.random.Generator,
                    conditions: conditions_model.ConditionSet = conditions_model.BUILTIN) -> Appearance:
    """Sample a concrete appearance of ``condition`` (colours jittered, wear drawn).

    Draws from ``np_random`` only what the condition shows: today's four conditions draw
    exactly what they always did, so their episodes are unchanged.
    """
    composition = conditions.resolve(condition)
    scenery, weather = conditions.scenery[composition.scenery], conditions.weather[composition.weather]
    base = {"asphalt": scenery.asphalt, "ground": scenery.ground, "edge": scenery.edge, "centre": scenery.centre,
            **weather.surfaces}

    def jitter(rgb):
        return tuple(float(v) for v in np.clip(np.asarray(rgb) + np_random.uniform(-1, 1, 3) * COLOUR_JITTER, 0, 1))

    appearance = Appearance(asphalt=jitter(base["asphalt"]), ground=jitter(base["ground"]), sky=weather.sky,
                            edge_line=jitter(base["edge"]), centre_line=jitter(base["centre"]), lighting=weather.light)
    roles = scenery_roles(scenery)
    if not roles:
        return appearance
    own = {"patch": scenery.patch, "verge": scenery.verge, "foliage": scenery.foliage, "building": scenery.building}
    def brighten(rgb):  # one factor for all channels: dark surfaces keep their hue
        return tuple(float(v) for v in np.clip(np.asarray(rgb) * (1.0 + np_random.uniform(-1, 1) * SHADE_JITTER), 0, 1))

    extra = tuple((role, brighten(own[role]) if role in own else FIXED_COLOURS[role]) for role in roles
                  if role != "terrain")  # the ground's colour: nothing drawn
    return dataclasses.replace(appearance, extra=extra)


def scenery_roles(scenery: conditions_model.Scenery) -> tuple[str, ...]:
    """The surfaces beyond road and markings that ``scenery`` builds, in a fixed order (``terrain``,
    the ground beside a graded road, last)."""
    wanted = (("patch", scenery.patches), ("verge", scenery.verge_width), ("kerb", scenery.kerb),
              ("foliage", scenery.trees + scenery.bushes), ("trunk", scenery.trees), ("pole", scenery.poles),
              ("post", scenery.posts), ("fence", scenery.fences), ("building", scenery.buildings),
              ("roof", scenery.buildings), ("car", scenery.parked_cars),
              ("terrain", scenery.grade or scenery.bank_deg))
    return tuple(role for role, amount in wanted if amount)


def _sections(track: Track, elevation: Elevation | None = None) -> np.ndarray:
    """Arc lengths of road cross-sections: dense where the road bends (or, graded, where its
    grade or bank changes), sparse on straights.

    PyBullet keeps about 100-200 bytes per mesh vertex for the life of the process (even
    across ``resetSimulation``), so the mesh uses as few vertices as the curvature allows.
    """
    fine = np.append(np.arange(0.0, track.length, MESH_STEP), track.length)
    heading = track.pose(fine)[2]
    turn = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(heading)))])
    limits = [(turn, MESH_MAX_TURN)]
    if elevation is not None:
        for angle, limit in ((np.arctan(elevation.grade_at(fine)), MESH_MAX_PITCH),
                             (elevation.superelevation(fine), MESH_MAX_BANK)):
            limits.append((np.concatenate([[0.0], np.cumsum(np.abs(np.diff(angle)))]), limit))
    chosen, last_s, last = [0.0], 0.0, [0.0] * len(limits)
    for i, s in enumerate(fine[1:-1], start=1):
        if s - last_s >= MESH_MAX_STEP or any(total[i] - mark >= limit
                                              for (total, limit), mark in zip(limits, last)):
            chosen.append(s)
            last_s, last = s, [total[i] for total, _ in limits]
    chosen.append(track.length)
    return np.asarray(chosen)


def _strip(track: Track, s: np.ndarray, left: float, right: float, z: float, surface: Elevation | None = None):
    """Vertices and triangles of a ribbon between lateral offsets ``right`` < ``left``, ``z``
    above the ground plane or, on a graded road, above its ``surface``."""
    n = len(s)
    vertices = np.empty((2 * n, 3))
    if surface is None:
        xl, yl = track.lateral_points(s, left)
        xr, yr = track.lateral_points(s, right)
        vertices[0::2] = np.c_[xl, yl, np.full(n, z)]
        vertices[1::2] = np.c_[xr, yr, np.full(n, z)]
    else:
        vertices[0::2] = np.stack(surface.surface(s, left), axis=1) + [0.0, 0.0, z]
        vertices[1::2] = np.stack(surface.surface(s, right), axis=1) + [0.0, 0.0, z]
    i = np.arange(n - 1) * 2
    # Counter-clockwise seen from above: (left_i, right_i, left_i+1), (right_i, right_i+1, left_i+1).
    triangles = np.c_[i, i + 1, i + 2, i + 1, i + 3, i + 2].reshape(-1, 3)
    return vertices, triangles


def _pieces(track: Track, sections: np.ndarray, starts: np.ndarray, length: float, left: float, right: float,
            z: float, surface: Elevation | None = None):
    """Many short ribbons (dashes, worn line pieces) merged into one mesh."""
    vertices, triangles, count = [], [], 0
    for start in starts:
        end = min(start + length, track.length)
        inner = sections[(sections > start) & (sections < end)]
        v, t = _strip(track, np.concatenate([[start], inner, [end]]), left, right, z, surface)
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
_NORMAL_SLOTS: list[list[float]] = []  # the same for the normals of meshes that have their own
_UP = [0.0, 0.0, 1.0]  # the one normal of every flat mesh
_ORIGIN = (0.0, 0.0, 0.0)  # what the holders hold between meshes
_MESH_ARGS: tuple[list, list, list] = ([], [], [])  # the vertices, normals and indices passed to pybullet
_MESH_LOCK = threading.Lock()  # the holders are shared by every client of the process


def _fill(slots: list[list[float]], rows: np.ndarray) -> list[list[float]]:
    """The first ``len(rows)`` holders of ``slots`` (grown as needed), holding ``rows``."""
    while len(slots) < len(rows):
        slots.append(list(_ORIGIN))
    for slot, row in zip(slots, rows.tolist()):
        slot[:] = row
    return slots[:len(rows)]


def _mesh_shape(client, vertices, triangles, double_sided=False, normals=None) -> int:
    """A visual mesh shape; ``normals`` (N, 3) per vertex, or all pointing up (flat surfaces)."""
    if double_sided:
        triangles = np.concatenate([triangles, triangles[:, ::-1]])
    vertex_arg, normal_arg, index_arg = _MESH_ARGS
    with _MESH_LOCK:
        vertex_arg[:] = _fill(_VERTEX_SLOTS, vertices)
        # Flat meshes: all normals point up, so the sky and ground are shaded uniformly whatever the light.
        normal_arg[:] = [_UP] * len(vertices) if normals is None else _fill(_NORMAL_SLOTS, normals)
        index_arg[:] = triangles.reshape(-1).tolist()
        try:
            return client.createVisualShape(p.GEOM_MESH, vertices=vertex_arg, indices=index_arg,
                                            normals=normal_arg, rgbaColor=[1.0, 1.0, 1.0, 1.0])
        finally:  # keep nothing of this mesh alive
            for slot in vertex_arg:
                slot[:] = _ORIGIN
            if normals is not None:
                for slot in normal_arg:
                    slot[:] = _ORIGIN
            for arg in _MESH_ARGS:
                arg.clear()


def _body(client, shape: int, collision: int = -1) -> int:
    return client.createMultiBody(baseMass=0, baseVisualShapeIndex=shape, baseCollisionShapeIndex=collision)


def marking_keep(condition: str) -> float:
    """Fraction of painted line pieces that survive in ``condition`` (< 1: worn markings)."""
    return float(SCENERY_OF(condition).keep)


def SCENERY_OF(condition: str, conditions=conditions_model.BUILTIN):  # noqa: N802 (reads like a table)
    return conditions.scenery[conditions.resolve(condition).scenery]


@dataclass(frozen=True)
class RoadShapes:
    """Visual shape ids of one track's road and scenery (built once per world), by colour role,
    in the order their bodies are created; whether the road is graded and where the far ground
    plane goes then. (Not its :class:`Elevation`: that keeps the whole track alive, about 0.25 MB,
    for every cached road; :meth:`World.show` rebuilds it, a fixed function of track and scenery.)"""

    shapes: tuple[tuple[str, int], ...]
    graded: bool = False
    """The scenery has grade or bank (sim.track.elevation)."""
    ground_level: float = 0.0
    """[m] where the ground plane (and the sky box with it) sits while this road is shown."""


PATCH_LENGTH = (1.0, 4.0)  # [m] length range of asphalt repair patches
SEAM_WIDTH = 0.06  # [m] tar seams along the road
KERB_WIDTH = 0.25  # [m]
DOUBLE_GAP = 0.12  # [m] between the two lines of a double centre line


def road_edges(lane_width: float) -> tuple[float, float]:
    """(right, left) edges of the asphalt [m] as lateral offsets from the ego-lane centre."""
    return -lane_width / 2 - SHOULDER, 1.5 * lane_width + SHOULDER


def road_elevation(track: Track, scenery: conditions_model.Scenery, name: str) -> Elevation | None:
    """The height and bank of ``track`` under the scenery ``name`` (a fixed function of the two
    names, like its objects), or None when the scenery is level (grade and bank 0)."""
    if not (scenery.grade or scenery.bank_deg):
        return None
    return Elevation(track, scenery.grade, scenery.bank_deg, scenery_model._rng(track, name, "elevation"),
                     road_edges(track.lane_width))


def _line(track, sections, wear, keep_fraction, left, right, period, length, surface=None):
    """A painted line between lateral offsets, dashed (``period`` > ``length``) or solid, worn."""
    if keep_fraction >= 1.0 and period <= length:
        return _strip(track, sections, left, right, LINE_Z, surface)
    starts = np.arange(0.0, track.length, period)
    kept = starts[wear.uniform(size=len(starts)) < keep_fraction]
    return _pieces(track, sections, kept, length, left, right, LINE_Z, surface)


def build_road_shapes(client, track: Track, condition: str,
                      conditions: conditions_model.ConditionSet = conditions_model.BUILTIN,
                      elevation: Elevation | None = None) -> RoadShapes:
    """Meshes of the road surface, markings and scenery of ``track`` under ``condition``'s scenery
    (and, when the scenery has grade or bank, of the ground beside the road and the collision
    surface the tyres roll on).

    Which line pieces are worn away and where objects stand is a fixed function of the track
    and the scenery, so the shapes can be reused for every episode on that track. ``elevation``:
    the road's, if already built (:func:`road_elevation`).
    """
    name = conditions.resolve(condition).scenery
    scenery = conditions.scenery[name]
    keep_fraction = scenery.keep
    wear = np.random.default_rng([zlib.crc32(track.name.encode()), zlib.crc32(name.encode())])
    lane = track.lane_width
    right_edge, left_edge = -lane / 2, 1.5 * lane  # [m] road edges relative to the ego-lane centre
    if elevation is None:
        elevation = road_elevation(track, scenery, name)
    sections = _sections(track, elevation)
    shapes = [("asphalt", _mesh_shape(client, *_strip(track, sections, left_edge + SHOULDER,
                                                      right_edge - SHOULDER, ROAD_Z, elevation)))]
    edges = {"both": ((right_edge, 1.0), (left_edge, -1.0)), "right_only": ((right_edge, 1.0),), "none": ()}
    for edge, inward in edges[scenery.edge_style]:
        left, right = max(edge, edge + inward * LINE_WIDTH), min(edge, edge + inward * LINE_WIDTH)
        # worn edge lines: 3 m pieces, some of them missing
        v, t = _line(track, sections, wear, keep_fraction, left, right, DASH_LENGTH, DASH_LENGTH, elevation)
        if v is not None:
            shapes.append(("edge_line", _mesh_shape(client, v, t)))
    middle, half = lane / 2, LINE_WIDTH / 2
    if scenery.centre_style == "dashed":
        v, t = _line(track, sections, wear, keep_fraction, middle + half, middle - half, DASH_PERIOD, DASH_LENGTH,
                     elevation)
        if v is not None:
            shapes.append(("centre_line", _mesh_shape(client, v, t)))
    elif scenery.centre_style in ("solid", "double_yellow"):
        offsets = (0.0,) if scenery.centre_style == "solid" else (-DOUBLE_GAP, DOUBLE_GAP)
        for offset in offsets:
            v, t = _line(track, sections, wear, keep_fraction, middle + offset + half, middle + offset - half,
                         DASH_LENGTH, DASH_LENGTH, elevation)
            if v is not None:
                shapes.append(("centre_line", _mesh_shape(client, v, t)))
    shapes += _surface_shapes(client, track, scenery, name, sections, right_edge - SHOULDER, left_edge + SHOULDER,
                              elevation)
    if elevation is None:
        objects = scenery_model.object_meshes(track, scenery, name)
    else:
        objects = scenery_model.object_meshes(track, scenery, name, ground=elevation.ground)
    for role, mesh in objects.items():
        vertices, triangles, normals = mesh
        shapes.append((role, _mesh_shape(client, vertices, triangles, normals=normals)))
    if elevation is None:
        return RoadShapes(shapes=tuple(shapes))
    vertices, triangles, level = terrain_mesh(elevation, sections)
    shapes.append(("terrain", _mesh_shape(client, vertices, triangles)))
    return RoadShapes(shapes=tuple(shapes), graded=True, ground_level=level)


def _surface_shapes(client, track, scenery, name, sections, right, left, surface=None) -> list[tuple[str, int]]:
    """Patches and tar seams on the asphalt, verges and kerbs beside it (flat meshes)."""
    out = []
    if scenery.patches:
        rng = np.random.default_rng([zlib.crc32(track.name.encode()), zlib.crc32(name.encode()), 1])
        count = rng.poisson(scenery.patches * track.length / 100.0)
        meshes = []
        for _ in range(count):
            start = rng.uniform(0.0, track.length)
            if rng.uniform() < 0.3:  # a tar seam: long and thin
                length, centre, width = rng.uniform(5.0, 20.0), rng.uniform(right + 0.5, left - 0.5), SEAM_WIDTH
            else:
                length, width = rng.uniform(*PATCH_LENGTH), rng.uniform(0.5, 2.5)
                centre = rng.uniform(right + width / 2, left - width / 2)
            v, t = _pieces(track, sections, np.array([start]), length, centre + width / 2, centre - width / 2,
                           PATCH_Z, surface)
            meshes.append((v, t, np.zeros_like(v)))
        if meshes:
            v, t, _ = scenery_model.merge(meshes)
            out.append(("patch", _mesh_shape(client, v, t)))
    if scenery.verge_width:
        v1, t1 = _strip(track, sections, right, right - scenery.verge_width, VERGE_Z, surface)
        v2, t2 = _strip(track, sections, left + scenery.verge_width, left, VERGE_Z, surface)
        out.append(("verge", _mesh_shape(client, np.r_[v1, v2], np.r_[t1, t2 + len(v1)])))
    if scenery.kerb:
        v1, t1 = _strip(track, sections, right, right - KERB_WIDTH, PATCH_Z, surface)
        v2, t2 = _strip(track, sections, left + KERB_WIDTH, left, PATCH_Z, surface)
        out.append(("kerb", _mesh_shape(client, np.r_[v1, v2], np.r_[t1, t2 + len(v1)])))
    return out


def _grid(sections: int, columns: int) -> np.ndarray:
    """Triangles of a (sections x columns) vertex grid whose columns run right to left,
    counter-clockwise seen from above (as :func:`_strip`)."""
    i, j = np.arange(sections - 1)[:, None], np.arange(columns - 1)[None, :]
    here, ahead = i * columns + j, (i + 1) * columns + j
    return np.stack([here + 1, here, ahead + 1, here, ahead, ahead + 1], axis=-1).reshape(-1, 3)


def _reach(elevation: Elevation, s: np.ndarray, side: float) -> np.ndarray:
    """How far [m] beyond the asphalt edge on ``side`` (+1 left, -1 right) the ground's cross-section
    at each ``s`` may run before another stretch of the road (its asphalt and apron): a cross-section
    never spans another bit of road (hairpins, roads coming back), whose own ground covers it."""
    right, left = elevation.edges
    keep = max(-right, left) + elevation_model.APRON + TERRAIN_KEEP  # [m] from the other road's centre line
    edge = left if side > 0 else -right
    reach = np.full(len(s), TERRAIN_COLUMNS[-1])
    others, along_s = elevation._nearest_xy, elevation._nearest_s
    for start in range(0, len(s), 64):  # blocks of cross-sections bound the memory
        x, y, heading = elevation.centre(s[start:start + 64])
        dx, dy = others[:, 0] - x[:, None], others[:, 1] - y[:, None]
        cos, sin = np.cos(heading)[:, None], np.sin(heading)[:, None]
        along, lateral = cos * dx + sin * dy, side * (cos * dy - sin * dx)
        cuts = (np.abs(along) < TERRAIN_BAND) & (lateral > 0.0) & \
            (np.abs(along_s - s[start:start + 64, None]) > TERRAIN_OWN)
        nearest = np.where(cuts, lateral, np.inf).min(axis=1)
        reach[start:start + 64] = np.minimum(reach[start:start + 64], nearest - keep - edge)
    return np.maximum(reach, elevation_model.APRON)


def terrain_mesh(elevation: Elevation, sections: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The ground beside a graded road: cross-sections at the road's ``sections`` (and beyond its
    ends) from ``TERRAIN_COLUMNS[-1]`` m right of the asphalt to as far left, under the asphalt
    too (where the road ends, the ground goes on). Heights follow :meth:`Elevation.ground` and
    fade into the far ground plane, whose height is returned: ``FAR_BELOW`` under the lowest point.

    Returns vertices, triangles and the far ground plane's height [m]."""
    ends = np.asarray(TERRAIN_ENDS)
    s = np.concatenate([-ends[::-1], sections, elevation.track.length + ends])
    right, left = elevation.edges
    columns = np.asarray(TERRAIN_COLUMNS)
    beyond = np.concatenate([columns[::-1], [0.0, 0.0], columns])  # [m] beyond the asphalt edge, right to left
    sides = np.concatenate([-np.ones(len(columns) + 1), np.ones(len(columns) + 1)])
    reach = np.where(sides > 0, _reach(elevation, s, 1.0)[:, None], _reach(elevation, s, -1.0)[:, None])
    beyond = np.minimum(beyond, reach)  # (sections, columns)
    t = np.where(sides > 0, left + beyond, right - beyond)
    x, y, z = elevation.surface(s[:, None], t)
    far = beyond > elevation_model.APRON
    z = np.where(far, 0.0, z)
    z[far] = elevation.ground(x[far], y[far])
    level = float(z.min()) - FAR_BELOW
    fade = beyond - TERRAIN_FADE[0]
    weight = np.clip(fade / (TERRAIN_FADE[1] - TERRAIN_FADE[0]), 0.0, 1.0)
    weight = weight * weight * (3.0 - 2.0 * weight)
    z = (1.0 - weight) * z + weight * level + GROUND_Z
    vertices = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    triangles = _grid(len(s), len(beyond[0])).reshape(len(s) - 1, len(beyond[0]) - 1, 2, 3)
    under = (s[:-1] >= 0.0) & (s[1:] <= elevation.track.length)  # the asphalt covers it: not drawn
    keep = np.ones(triangles.shape[:2], bool)
    keep[under, len(columns)] = False  # the column between the two asphalt edges
    return vertices, triangles[keep].reshape(-1, 3), level


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
        self.road_bodies: list[tuple[str, int]] = []
        self.elevation: Elevation | None = None  # the shown road's height and bank (None: level)
        self.surface_body: int | None = None  # graded roads: the level plane the car drives on (no visual)
        self.ground_level = 0.0  # [m] height of the ground plane and sky box (lowered under graded roads)
        self._car_shape: int | None = None
        self._plane_shape: int | None = None  # collision shape of the level plane graded roads are driven on
        self._stand_in_shapes: tuple[int, ...] | None = None  # visual shapes of the ego car's stand-in

    def car_shape(self) -> int:
        """The visual shape of a moving car (``sim.traffic``), built once per world and shared
        by every car body (each body keeps its own paint)."""
        if self._car_shape is None:
            vertices, triangles, normals = traffic_model.car_mesh()
            self._car_shape = _mesh_shape(self.client, vertices, triangles, normals=normals)
        return self._car_shape

    def car_stand_in(self, params) -> int:
        """A new visual-only body showing the ego car (``sim.vehicle.VehicleParams`` ``params``) for
        the chase view of graded roads, where the simulated car has no visuals (``sim.env``):
        the chassis, with the cabin and the four wheels as fixed links. It waits under the ground."""
        if self._stand_in_shapes is None:
            self._stand_in_shapes = tuple(_mesh_shape(self.client, *mesh[:2], normals=mesh[2])
                                          for mesh in traffic_model.ego_meshes(params))
        chassis, *links = self._stand_in_shapes
        body = self.client.createMultiBody(
            baseMass=0, baseVisualShapeIndex=chassis, basePosition=traffic_model.HIDDEN, linkMasses=[0, 0],
            linkCollisionShapeIndices=[-1, -1], linkVisualShapeIndices=links, linkPositions=[[0, 0, 0]] * 2,
            linkOrientations=[[0, 0, 0, 1]] * 2, linkInertialFramePositions=[[0, 0, 0]] * 2,
            linkInertialFrameOrientations=[[0, 0, 0, 1]] * 2, linkParentIndices=[0, 0],
            linkJointTypes=[p.JOINT_FIXED] * 2, linkJointAxis=[[0, 0, 1]] * 2)
        for link, colour in zip((-1, 0, 1), traffic_model.EGO_COLOURS):
            self.client.changeVisualShape(body, link, rgbaColor=[*colour, 1.0])
        return body

    @staticmethod
    def _key(track_key: str, condition: str, conditions) -> tuple[str, str]:
        """Roads are cached per (track, scenery): the weather and camera build no geometry."""
        return track_key, conditions.resolve(condition).scenery

    def is_full_for(self, track_key: str, condition: str,
                    conditions: conditions_model.ConditionSet = conditions_model.BUILTIN) -> bool:
        """Whether showing this road would build more than ``ROADS_PER_WORLD`` roads' meshes."""
        return (self._key(track_key, condition, conditions) not in self.road_cache
                and len(self.road_cache) >= ROADS_PER_WORLD)

    def show(self, track: Track, track_key: str, condition: str,
             conditions: conditions_model.ConditionSet = conditions_model.BUILTIN) -> None:
        """Make the road and scenery of ``track`` (identified by ``track_key``) under ``condition`` visible."""
        extent = max(np.abs(track.x).max(), np.abs(track.y).max())
        if extent > WORLD_REACH:
            raise ValueError(
                f"track {track.name!r} reaches {extent:.0f} m from the origin; the world is "
                f"{WORLD_REACH:.0f} m across from the centre: move its start or shorten it")
        key = self._key(track_key, condition, conditions)
        if key == self.road_key:
            return
        for _, body in self.road_bodies:
            self.client.removeBody(body)
        if self.surface_body is not None:
            self.client.removeBody(self.surface_body)
            self.surface_body = None
        name = key[1]
        self.elevation = road_elevation(track, conditions.scenery[name], name)
        if key not in self.road_cache:
            self.road_cache[key] = build_road_shapes(self.client, track, condition, conditions, self.elevation)
        road = self.road_cache[key]
        self.road_bodies = [(role, _body(self.client, shape)) for role, shape in road.shapes]
        self.road_key = key
        if road.graded:  # the car drives in the road's frame: on this plane (sim.env)
            if self._plane_shape is None:
                self._plane_shape = self.client.createCollisionShape(p.GEOM_PLANE)
            self.surface_body = self.client.createMultiBody(baseMass=0, baseCollisionShapeIndex=self._plane_shape,
                                                            basePosition=[0.0, 0.0, DRIVING_PLANE_Z])
            self.client.changeDynamics(self.surface_body, -1, lateralFriction=1.0, rollingFriction=0.0,
                                       spinningFriction=0.0)
        if road.ground_level != self.ground_level:  # graded roads lower it below their dips
            for body in (self.ground, self.sky):
                self.client.resetBasePositionAndOrientation(body, [0.0, 0.0, road.ground_level], [0, 0, 0, 1])
            self.ground_level = road.ground_level

    def semantic_table(self, vehicles: tuple[int, ...] = ()) -> np.ndarray:
        """The ``SEMANTIC_CLASSES`` id of every body of the client, indexed by body id + 1 (index 0:
        no body, the -1 of a segmentation mask), as uint8: ``table[mask + 1]`` is the semantic
        image. ``vehicles`` are the cars' bodies; a body this world did not build and that is not
        among them is ``sky`` (0)."""
        classes = {self.ground: GROUND, self.sky: SKY, **{body: ROLE_CLASSES[role] for role, body in self.road_bodies},
                   **{body: VEHICLE for body in vehicles}}
        bodies = [self.client.getBodyUniqueId(i) for i in range(self.client.getNumBodies())]
        table = np.zeros(max([*classes, *bodies]) + 2, np.uint8)
        for body, value in classes.items():
            table[body + 1] = value
        return table

    def paint(self, appearance: Appearance) -> None:
        """Colour everything with ``appearance`` (no new geometry is created)."""
        paint = [(self.ground, appearance.ground), (self.sky, appearance.sky)]
        paint += [(body, appearance.colour(role)) for role, body in self.road_bodies]
        for body, colour in paint:
            self.client.changeVisualShape(body, -1, rgbaColor=[*colour, 1.0])
