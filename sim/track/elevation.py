"""Elevation and superelevation of a road (OpenDRIVE-style): grade, hills, dips and banking.

A road's height is read from a smooth **terrain field** ``Z(x, y)``: a sum of a few
squared raised-cosine hills and dips (radii 40-150 m, i.e. wavelengths 80-300 m; squared so the
road's vertical curvature is continuous, which a car without suspension feels) placed along the
route, drawn from a generator the caller seeds (``sim.scene`` seeds it from the track's and
the scenery's names, as ``sim.scenery`` places objects). The centre line's height is
``z(s) = Z(x(s), y(s))`` and its grade ``dz/ds = grad Z . (cos heading, sin heading)``, both in
closed form. The field is scaled so that the steepest point of the route climbs or falls at
``GRADE_FILL`` x the scenery's ``grade``, and it is faded out within ``FLAT_START`` (20 m) of the
route's start point (smootherstep over the next ``FADE_IN`` metres), so the car starts on level
ground (z = 0, dz/ds = 0).

Why a field of (x, y) rather than a profile of s: where a route comes back near itself
(hairpins, the inside of 120 degree bends) a profile of s would put two bits of road a few
metres apart at unrelated heights, with no terrain between them but a cliff; heights from one
field agree everywhere, so the ground beside the road (:meth:`Elevation.ground`) is a single
surface, and objects stand on it.

**Superelevation** (bank) ``phi(s)`` [rad] is the road's roll about its centre line, positive
raising the left edge (OpenDRIVE's sign: a positive superelevation falls to the right). Roads
bank into their curves: ``-bank * tanh(k * BANK_RADIUS)`` (a curve of ``BANK_RADIUS`` = 100 m
banks at 76 % of the scenery's ``bank_deg``, tighter ones at nearly all of it), smoothed along
the road with a triangular window ``BANK_RUNOFF`` (40 m) long, so the bank runs in and out over
about 40 m (a superelevation runoff), starting before the curve; ``|phi| < bank``.

Cross-section and lateral offset: at progress ``s`` a point at lateral offset ``t`` (left of the
centre line, measured **in the banked plane**) lies at horizontal offset ``u = t cos(phi)`` and
height ``z(s) + t sin(phi)`` across the asphalt (between the edges ``t_right`` and ``t_left``);
beyond the asphalt edges the verges and the ground are level with the edge (``u`` grows by what
``t`` grows). So ``t = u / cos(phi)`` on the asphalt. Progress ``s`` stays the plan-view arc
length of the centre line, heading errors stay in plan view. Beyond the route's ends the road
continues straight along its end tangents (for the ground, the lead car and oncoming cars).
"""

from __future__ import annotations

import math

import numpy as np

from steerloop.sim.track.geometry import Track

MAX_GRADE = 0.10  # [-] steepest grade a scenery may ask for (10 %)
MAX_BANK_DEG = 6.0  # [deg] largest superelevation a scenery may ask for
FLAT_START = 20.0  # [m] the field is zero within this distance of the route's start point ...
FADE_IN = 40.0  # [m] ... and reaches its full height this much farther out (smootherstep)
BUMP_RADIUS = (40.0, 150.0)  # [m] radius range of the hills and dips (wavelengths 80-300 m)
BUMP_SPACING = 60.0  # [m] one hill or dip per this much route (and its extensions)
BUMP_LATERAL = 60.0  # [m] bump centres lie within this distance of the centre line
HILL_FRACTION = 0.65  # [-] share of bumps that are hills (the others are dips)
GRADE_FILL = 0.97  # [-] the route's steepest grade is this fraction of the scenery's grade
GRADE_STEP = 0.25  # [m] spacing of the centre-line points where the steepest grade is found
BANK_RADIUS = 100.0  # [m] a curve of this radius banks at tanh(1) = 76 % of the largest bank
BANK_RUNOFF = 40.0  # [m] length of the triangular window that smooths the bank along the road
BANK_STEP = 0.25  # [m] spacing of the table the smoothed bank is interpolated from
EXTENSION = 100.0  # [m] the road continues straight this far beyond both ends (ground, traffic)
APRON = 2.5  # [m] beyond the asphalt edge the ground is level with the edge over this width ...
BLEND = 10.0  # [m] ... and then blends into the terrain field over this width (smoothstep)
NEAREST_STEP = 1.0  # [m] spacing of the centre-line points the ground's nearest-road search uses
NEAREST_CHUNK = 512  # [-] query points per block of the nearest-road search (bounds its memory)
NORMAL_STEP = 0.01  # [m] central-difference step of the surface normal


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, C1 in between."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class Elevation:
    """Height, grade and superelevation of one track's road, and the ground beside it.

    Args:
        track: The route (its plan view).
        grade: Steepest grade of the route [-], 0 to ``MAX_GRADE`` (0: level).
        bank_deg: Largest superelevation [deg], 0 to ``MAX_BANK_DEG`` (0: none).
        rng: Generator the hills and dips are drawn from (seed it from the track and scenery).
        edges: ``(t_right, t_left)``, the asphalt's edges [m] as lateral offsets from the centre line.
    """

    def __init__(self, track: Track, grade: float, bank_deg: float, rng: np.random.Generator,
                 edges: tuple[float, float]):
        if not 0.0 <= grade <= MAX_GRADE:
            raise ValueError(f"Elevation: grade must be within [0, {MAX_GRADE:g}], got {grade!r}")
        if not 0.0 <= bank_deg <= MAX_BANK_DEG:
            raise ValueError(f"Elevation: bank_deg must be within [0, {MAX_BANK_DEG:g}] deg, got {bank_deg!r}")
        self.track = track
        self.grade = float(grade)
        self.bank = math.radians(bank_deg)
        self.edges = (float(edges[0]), float(edges[1]))
        x0, y0, _ = track.pose(0.0)
        self.start = np.array([x0, y0])
        count = max(1, math.ceil((track.length + 2.0 * EXTENSION) / BUMP_SPACING))
        along = rng.uniform(-EXTENSION, track.length + EXTENSION, count)
        lateral = rng.uniform(-BUMP_LATERAL, BUMP_LATERAL, count)
        self.radii = rng.uniform(*BUMP_RADIUS, count)
        sign = np.where(rng.uniform(size=count) < HILL_FRACTION, 1.0, -1.0)
        x, y, heading = self.centre(along)
        self.centres = np.c_[x - lateral * np.sin(heading), y + lateral * np.cos(heading)]
        self.amplitudes = sign * self.radii * rng.uniform(0.5, 1.0, count)  # [m], rescaled below
        s = np.append(np.arange(0.0, track.length, GRADE_STEP), track.length)
        steepest = float(np.abs(self.grade_at(s)).max()) if grade > 0.0 else 0.0
        self.amplitudes = self.amplitudes * (GRADE_FILL * grade / steepest if steepest > 0.0 else 0.0)
        self._bank_s, self._bank = self._bank_table()
        self._nearest_s = np.arange(-EXTENSION, track.length + EXTENSION + NEAREST_STEP / 2, NEAREST_STEP)
        nx, ny, _ = self.centre(self._nearest_s)
        self._nearest_xy = np.c_[nx, ny]

    # ------------------------------------------------------------------ the terrain field
    def field(self, x, y) -> np.ndarray:
        """The terrain field ``Z(x, y)`` [m] (vectorised)."""
        return self._field(np.asarray(x, float), np.asarray(y, float))

    def _bumps(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per point and bump: offsets ``(px, py)`` [m] from the bump's centre, ``r / R``, the raised
        cosine (squared: C2 at the rim) and that square within the bump's radius (0 beyond)."""
        px, py = x[..., None] - self.centres[:, 0], y[..., None] - self.centres[:, 1]
        ratio = np.sqrt(px * px + py * py) / self.radii
        cosine = 0.5 * (1.0 + np.cos(np.pi * ratio))
        return px, py, ratio, cosine, np.where(ratio < 1.0, cosine * cosine, 0.0)

    def _field(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``Z`` at points of any shape (the height alone: no gradient)."""
        bump = self._bumps(x, y)[-1]
        return self._window(x, y)[0] * (bump * self.amplitudes).sum(axis=-1)

    def _field_and_gradient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``Z`` and its gradient ``(dZ/dx, dZ/dy)`` at points of any shape."""
        px, py, ratio, cosine, bump = self._bumps(x, y)
        inside = ratio < 1.0
        # d/dr of the bump divided by r, finite at r = 0: 2 cosine * -(pi / R)^2 / 2 * sinc(r / R)
        slope = np.where(inside, -cosine * (np.pi / self.radii) ** 2 * np.sinc(ratio), 0.0)
        total = (bump * self.amplitudes).sum(axis=-1)
        gx = (slope * self.amplitudes * px).sum(axis=-1)
        gy = (slope * self.amplitudes * py).sum(axis=-1)
        window, ramp, sx, sy, unit = self._window(x, y)
        return window * total, window * gx + total * ramp * sx * unit, window * gy + total * ramp * sy * unit

    def _window(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """The fade-in ``W(r0)`` around the start (0 within ``FLAT_START``, a smootherstep (C2) up to
        1 over ``FADE_IN``), its derivative ``dW/dr0`` [1/m], the offsets ``(sx, sy)`` [m] from the
        start and ``1 / r0`` (0 at the start)."""
        sx, sy = x - self.start[0], y - self.start[1]
        r0 = np.sqrt(sx * sx + sy * sy)
        phase = np.clip((r0 - FLAT_START) / FADE_IN, 0.0, 1.0)
        window = phase ** 3 * (10.0 - 15.0 * phase + 6.0 * phase ** 2)
        ramp = 30.0 * phase ** 2 * (1.0 - phase) ** 2 / FADE_IN  # its derivative [1/m]
        unit = np.where(r0 > 0.0, 1.0 / np.where(r0 > 0.0, r0, 1.0), 0.0)
        return window, ramp, sx, sy, unit

    # ------------------------------------------------------------------ the centre line
    def centre(self, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plan-view pose ``(x, y, heading)`` of the centre line at ``s`` [m], continuing straight
        along the end tangents beyond ``[0, length]`` (vectorised)."""
        s = np.asarray(s, float)
        on_road = np.clip(s, 0.0, self.track.length)
        x, y, heading = self.track.pose(on_road)
        beyond = s - on_road
        return x + beyond * np.cos(heading), y + beyond * np.sin(heading), heading

    def height(self, s):
        """Height ``z(s)`` [m] of the centre line (vectorised)."""
        x, y, _ = self.centre(s)
        return self._field(x, y)

    def grade_at(self, s):
        """Grade ``dz/ds`` [-] of the centre line (vectorised; + = climbing)."""
        x, y, heading = self.centre(s)
        _, gx, gy = self._field_and_gradient(x, y)
        return gx * np.cos(heading) + gy * np.sin(heading)

    def _bank_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The smoothed superelevation on a ``BANK_STEP`` grid covering the road and its extensions:
        ``-bank * tanh(k * BANK_RADIUS)`` (k = 0 beyond the ends, where the road runs straight),
        averaged twice over half the runoff (two boxes make the triangular window)."""
        half = int(round(BANK_RUNOFF / 2 / BANK_STEP))
        s = np.arange(-EXTENSION - BANK_RUNOFF, self.track.length + EXTENSION + BANK_RUNOFF, BANK_STEP)
        on_road = (s >= 0.0) & (s <= self.track.length)
        raw = np.where(on_road, -self.bank * np.tanh(self.track.curvature_at(s) * BANK_RADIUS), 0.0)
        box = np.ones(half) / half
        return s, np.convolve(np.convolve(raw, box, mode="same"), box, mode="same")

    def superelevation(self, s):
        """Roll ``phi(s)`` [rad] of the road about its centre line, + = left edge up (vectorised)."""
        s = np.asarray(s, float)
        if self.bank == 0.0:
            return np.zeros_like(s)
        return np.interp(s, self._bank_s, self._bank)

    # ------------------------------------------------------------------ the road surface
    def surface(self, s, t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World point ``(x, y, z)`` of the road surface at ``s`` and banked lateral offset ``t``
        [m] (level with the asphalt's edge beyond it; vectorised with broadcasting)."""
        s, t = np.asarray(s, float), np.asarray(t, float)
        shape = np.broadcast_shapes(s.shape, t.shape)  # read-only views (broadcast_arrays' writable ones warn)
        return self._across(self._section(np.broadcast_to(s, shape)), np.broadcast_to(t, shape))

    def _section(self, s: np.ndarray, centre: tuple | None = None) -> tuple[np.ndarray, ...]:
        """The cross-section at ``s``: the centre line's ``(x, y, heading)`` (``centre``, if given),
        roll ``phi`` and height."""
        x, y, heading = self.centre(s) if centre is None else centre
        return x, y, heading, self.superelevation(s), self._field(x, y)

    def _across(self, section: tuple[np.ndarray, ...], t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The surface point at banked offset ``t`` across each ``section``."""
        x, y, heading, phi, height = section
        clipped = np.clip(t, *self.edges)
        u = clipped * np.cos(phi) + (t - clipped)
        return x - u * np.sin(heading), y + u * np.cos(heading), height + clipped * np.sin(phi)

    def banked_offset(self, s, u):
        """Banked lateral offset ``t`` [m] of the point at horizontal offset ``u`` [m] at ``s``."""
        cos = np.cos(self.superelevation(s))
        low, high = self.edges[0] * cos, self.edges[1] * cos
        clipped = np.clip(u, low, high)
        return clipped / cos + (np.asarray(u, float) - clipped)

    def normal(self, s, t) -> np.ndarray:
        """Unit normal(s) of the road surface at ``s``, ``t`` (central differences; scalars give
        shape (3,), arrays (N, 3))."""
        return self.point_and_normal(s, t)[1]

    def point_and_normal(self, s, t) -> tuple[np.ndarray, np.ndarray]:
        """The surface point(s) ``(x, y, z)`` and unit normal(s) at ``s``, ``t``: the point and its four
        central-difference neighbours from the cross-sections at ``s`` and ``s +- NORMAL_STEP``, one
        vectorised evaluation (scalars give shapes (3,), arrays (N, 3))."""
        s, t, h = np.asarray(s, float), np.asarray(t, float), NORMAL_STEP
        shape = np.broadcast_shapes(s.shape, t.shape)
        s, t = np.broadcast_to(s, shape), np.broadcast_to(t, shape)
        # Sections at s, s + h, s - h; points at (s, t), (s +- h, t) along and (s, t +- h) across.
        along = np.stack([s, s + h, s - h])
        centre = None
        if s.ndim == 0:  # one car, every step: the track's scalar pose is twice as fast on three points
            centre = tuple(np.array(v, float) for v in zip(*(self.centre(v) for v in along)))
        section = self._section(along, centre)
        rows = [0, 1, 2, 0, 0]
        x, y, z = self._across(tuple(v[rows] for v in section), np.stack([t, t, t, t + h, t - h]))
        ax, ay, az = x[1] - x[2], y[1] - y[2], z[1] - z[2]  # along the road
        cx, cy, cz = x[3] - x[4], y[3] - y[4], z[3] - z[4]  # across it
        nx, ny, nz = ay * cz - az * cy, az * cx - ax * cz, ax * cy - ay * cx
        norm = np.sqrt(nx * nx + ny * ny + nz * nz)
        return np.stack([x[0], y[0], z[0]], axis=-1), np.stack([nx / norm, ny / norm, nz / norm], axis=-1)

    def pose(self, s: float, t: float, yaw: float) -> tuple[np.ndarray, float, float]:
        """The surface point ``(x, y, z)`` at ``s``, ``t`` and the ``(roll, pitch)`` [rad] (PyBullet's
        Euler angles, with ``yaw``) of a car standing there heading ``yaw`` in plan view."""
        point, normal = self.point_and_normal(s, t)
        return (point, *attitude_on(normal, yaw))

    # ------------------------------------------------------------------ the ground beside it
    def ground(self, x, y) -> np.ndarray:
        """Height [m] of the ground at plan-view points (vectorised): level with the nearest
        road's asphalt edge (or its surface, under the asphalt) within ``APRON`` of the edge,
        blending into the terrain field over the next ``BLEND`` metres. One single-valued
        surface, whichever stretch of road is nearest."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        shape = np.broadcast(x, y).shape
        x, y = np.broadcast_to(x, shape).reshape(-1), np.broadcast_to(y, shape).reshape(-1)
        s, u = self._nearest(x, y)
        t = self.banked_offset(s, u)
        phi = self.superelevation(s)
        road = self.height(s) + np.clip(t, *self.edges) * np.sin(phi)
        beyond = np.maximum(np.maximum(t - self.edges[1], self.edges[0] - t), 0.0)
        blend = _smoothstep((beyond - APRON) / BLEND)
        return ((1.0 - blend) * road + blend * self._field(x, y)).reshape(shape)

    def _nearest(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Progress ``s`` of the nearest centre-line point (extensions included) and the signed
        horizontal offset ``u`` from it, for each point (projected onto the chords around the
        nearest sample)."""
        xy, ss = self._nearest_xy, self._nearest_s
        best = np.empty(len(x), int)
        for start in range(0, len(x), NEAREST_CHUNK):
            qx, qy = x[start:start + NEAREST_CHUNK, None], y[start:start + NEAREST_CHUNK, None]
            best[start:start + NEAREST_CHUNK] = np.argmin((xy[:, 0] - qx) ** 2 + (xy[:, 1] - qy) ** 2, axis=1)
        candidates = []
        for a in (np.maximum(best - 1, 0), np.minimum(best, len(ss) - 2)):  # the chords a -> a + 1
            ex, ey = xy[a + 1, 0] - xy[a, 0], xy[a + 1, 1] - xy[a, 1]
            f = np.clip(((x - xy[a, 0]) * ex + (y - xy[a, 1]) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            px, py = xy[a, 0] + f * ex, xy[a, 1] + f * ey
            candidates.append(((px - x) ** 2 + (py - y) ** 2, ss[a] + f * (ss[a + 1] - ss[a])))
        (d0, s0), (d1, s1) = candidates
        s = np.where(d0 <= d1, s0, s1)
        cx, cy, heading = self.centre(s)
        return s, np.cos(heading) * (y - cy) - np.sin(heading) * (x - cx)


def attitude_on(normal: np.ndarray, yaw: float) -> tuple[float, float]:
    """``(roll, pitch)`` [rad] of a body whose z axis is ``normal`` and whose x axis points along
    ``yaw`` in plan view (PyBullet's Euler convention: R = Rz(yaw) Ry(pitch) Rx(roll))."""
    nx, ny, nz = (float(v) for v in normal)
    cos, sin = math.cos(yaw), math.sin(yaw)
    fz = -(nx * cos + ny * sin) / nz
    length = math.sqrt(cos * cos + sin * sin + fz * fz)
    fx, fy, fz = cos / length, sin / length, fz / length  # the body's x axis on the surface
    side_z = nx * fy - ny * fx  # z of normal x forward: the body's y axis
    return math.atan2(side_z, nz), math.asin(-fz)
