"""Road geometry: an arc-length parametrised centre line with lane-frame queries.

A :class:`Track` is the centre line of the ego lane, built from a sequence of
:class:`Segment` pieces whose curvature is linear in arc length:

* ``"straight"`` -- zero curvature,
* ``"arc"``      -- constant curvature ``k = +-1/radius`` (``+`` = left turn),
* ``"clothoid"`` -- curvature going linearly from ``k_start`` to ``k_end`` (an Euler spiral).

Straights and arcs are evaluated in closed form; clothoids are integrated with
5-point Gauss-Legendre quadrature on short sub-steps (position error far below
1e-6 m). On top of the exact geometry the track keeps dense samples every
:data:`SAMPLE_STEP` metres (``track.s``, ``track.x``, ``track.y``, ``track.heading``,
``track.curvature``), which make the per-step lane query :meth:`Track.lane_state`
cheap: a nearest-sample search (global, or a downhill walk from the previous
progress ``s_hint`` bounded by a window) followed by a projection onto the
neighbouring chords and a Newton refinement on the exact curve.

Conventions
-----------
* Units are metres and radians, except in JSON specs, where arc angles and the
  start heading are given in degrees.
* Positive curvature / angle / lateral offset = left of the direction of travel.
* ``pose()`` returns the continuous (unwrapped) road heading; ``LaneState``
  angles are wrapped to ``[-pi, pi)``.

Curvature transitions
---------------------
Real roads do not jump from a straight directly into a curve. When a track is
built from a spec (:meth:`Track.from_spec`, :func:`generate_track`), a clothoid
transition of length ``Lt = min(transition_length, 0.5 * len(prev), 0.5 * len(next))``
is inserted at every joint between two constant-curvature segments (straight
or arc) whose curvatures differ. The transition takes ``Lt / 2`` from the end of
the previous segment and ``Lt / 2`` from the start of the next one, and its
curvature goes linearly from ``k_prev`` to ``k_next``. Its heading change,
``(k_prev + k_next) / 2 * Lt``, equals the heading change of the two removed
halves, so the total heading change (and the total length) of the route is
preserved exactly; only the corners are rounded off. Joints next to a
user-specified clothoid are left untouched (such clothoids normally *are* the
transition). ``transition_length=0`` disables the insertion.

JSON spec format
----------------
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from steerloop.errors import SteerloopError


# --------------------------------------------------------------------------- #
# Geometry constants
# --------------------------------------------------------------------------- #
SAMPLE_STEP = 0.25  # [m] spacing of the dense centre-line samples
DEFAULT_LANE_WIDTH = 3.7  # [m]
DEFAULT_TRANSITION_LENGTH = 10.0  # [m] clothoid transition length used by specs / generator
DEFAULT_LANE_STATE_WINDOW = 25.0  # [m] lane_state with a hint searches at most this far (arc length) from it
CLEARANCE_LANE_WIDTHS = 2.0  # [-] default clearance = this * lane_width (two lanes + shoulders)
SEGMENT_KINDS = ("straight", "arc", "clothoid")

_CLOTHOID_MAX_SUBSTEP = 1.0  # [m] longest quadrature sub-step on a clothoid
_CLOTHOID_MAX_SUBSTEP_TURN = 0.1  # [rad] largest heading change over one quadrature sub-step
_INTERSECTION_STEP = 0.5  # [m] sample spacing of the self-intersection check
_INTERSECTION_CHUNK = 128  # [-] rows per block of the pairwise-distance computation
_NEWTON_TOL = 1e-7  # [m] lane_state stops refining once the along-track residual is below this
_NEWTON_MAX_ITER = 4  # [-] Newton refinement iterations in lane_state
_NEWTON_MIN_DENOM = 0.1  # [-] floor of (1 - k * offset) so points near the curvature centre stay stable
_SAMPLE_END_TOL = 1e-6  # [m] a last sample closer than this to the end is snapped onto it

# 5-point Gauss-Legendre nodes / weights on [-1, 1].
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(5)
_GL_PAIRS = tuple(zip(_GL_NODES.tolist(), _GL_WEIGHTS.tolist()))


# --------------------------------------------------------------------------- #
# World limits (checked from the spec, before anything is built)
# --------------------------------------------------------------------------- #
WORLD_REACH = 2400.0  # [m] farthest a road may go from the origin along x or y (the ground of sim.scene spans
# +-3 km and keeps a 600 m margin so the horizon looks right)
MIN_ROUTE_LENGTH = 10.0  # [m] a shorter route ends before it begins: the environment ends every route 10 m
# before the end of its road
MAX_ROUTE_LENGTH = 2.0 * WORLD_REACH  # [m] the drivable world is this wide: a longer route cannot fit it
# without winding back on itself, and building one costs seconds and hundreds of MB before it is refused


def check_route_length(length: Any, field: str) -> float:
    """``length`` [m] as a float if a route may be that long, else ``ValueError`` naming
    ``field`` and the allowed range. Costs nothing: call it before building a route."""
    if not _is_number(length):
        raise ValueError(f"{field}: must be a route length in metres, got {length!r}")
    if length < MIN_ROUTE_LENGTH:
        raise ValueError(f"{field}: must be at least {MIN_ROUTE_LENGTH:g} m (a shorter route ends before the car "
                         f"is under way), got {length:g}")
    if length > MAX_ROUTE_LENGTH:
        raise ValueError(f"{field}: must be at most {MAX_ROUTE_LENGTH:g} m (the width of the world's drivable "
                         f"part: a longer route cannot fit it), got {length:g}")
    return float(length)




class TrackSpecError(SteerloopError):
    """Invalid track specification.

    The message names the offending field, e.g.
    ``"segments[2].radius: must be > 0, got -5 (in s-bend.json)"``.
    """



# --------------------------------------------------------------------------- #
# Segments and lane state
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Segment:
    """One piece of centre line whose curvature is linear in arc length.

    Attributes:
        kind: ``"straight"``, ``"arc"`` or ``"clothoid"``.
        length: Arc length [m], > 0.
        k_start: Curvature at the start [1/m], ``+`` = left turn.
        k_end: Curvature at the end [1/m]; equal to ``k_start`` for straights and arcs.

    Prefer the constructors :meth:`straight`, :meth:`arc` and :meth:`clothoid`.
    """

    kind: str
    length: float
    k_start: float = 0.0
    k_end: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(
                f"Segment.kind: unknown kind {self.kind!r}; valid kinds are "
                f"{', '.join(repr(k) for k in SEGMENT_KINDS)}"
            )
        for name in ("length", "k_start", "k_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"Segment.{name}: must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"Segment.{name}: must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.length <= 0.0:
            raise ValueError(f"Segment.length: must be > 0 [m], got {self.length!r}")
        if self.kind == "straight" and (self.k_start != 0.0 or self.k_end != 0.0):
            raise ValueError(
                f"Segment: a straight must have zero curvature, got k_start={self.k_start!r}, "
                f"k_end={self.k_end!r}; use kind='arc' or 'clothoid' for curved pieces"
            )
        if self.kind == "arc" and (self.k_start != self.k_end or self.k_start == 0.0):
            raise ValueError(
                f"Segment: an arc needs equal, non-zero k_start and k_end, got "
                f"k_start={self.k_start!r}, k_end={self.k_end!r}; use Segment.arc(radius, angle_deg)"
            )

    @classmethod
    def straight(cls, length: float) -> Segment:
        """Straight of ``length`` [m]."""
        return cls("straight", length, 0.0, 0.0)

    @classmethod
    def arc(cls, radius: float, angle_deg: float) -> Segment:
        """Circular arc of ``radius`` [m] > 0 turning by ``angle_deg`` [deg] (``+`` = left)."""
        if not (math.isfinite(radius) and radius > 0.0):
            raise ValueError(f"Segment.arc: radius must be > 0 [m], got {radius!r}")
        if not (math.isfinite(angle_deg) and angle_deg != 0.0):
            raise ValueError(f"Segment.arc: angle_deg must be non-zero and finite, got {angle_deg!r}")
        k = math.copysign(1.0 / radius, angle_deg)
        return cls("arc", radius * math.radians(abs(angle_deg)), k, k)

    @classmethod
    def clothoid(cls, length: float, k_start: float, k_end: float) -> Segment:
        """Clothoid of ``length`` [m] with curvature linear from ``k_start`` to ``k_end`` [1/m]."""
        return cls("clothoid", length, k_start, k_end)

    @property
    def curvature_rate(self) -> float:
        """dk/ds [1/m^2]."""
        return (self.k_end - self.k_start) / self.length

    @property
    def heading_change(self) -> float:
        """Total heading change over the segment [rad]: ``(k_start + k_end) / 2 * length``."""
        return 0.5 * (self.k_start + self.k_end) * self.length

    def to_spec(self) -> dict[str, Any]:
        """JSON-style dict of this segment (arc angles in degrees)."""
        if self.kind == "straight":
            return {"type": "straight", "length": self.length}
        if self.kind == "arc":
            return {
                "type": "arc",
                "radius": 1.0 / abs(self.k_start),
                "angle": math.degrees(self.k_start * self.length),
            }
        return {"type": "clothoid", "length": self.length, "k_start": self.k_start, "k_end": self.k_end}


@dataclass(frozen=True, slots=True)
class LaneState:
    """Pose of a point relative to the centre line (result of :meth:`Track.lane_state`).

    Attributes:
        s: Progress along the centre line [m], clamped to ``[0, track.length]``.
        offset: Signed lateral offset from the centre line [m], ``+`` = left of travel direction.
        heading_error: ``yaw - road_heading`` [rad], wrapped to ``[-pi, pi)``.
        curvature: Road curvature at ``s`` [1/m].
        road_heading: Road heading at ``s`` [rad], wrapped to ``[-pi, pi)``.
    """

    s: float
    offset: float
    heading_error: float
    curvature: float
    road_heading: float


def _wrap(angle: float) -> float:
    """Wrap an angle [rad] to ``[-pi, pi)``."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def _increments(th0: np.ndarray, k0: np.ndarray, sig: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Displacement after arc length ``u`` from a point with heading ``th0``, curvature ``k0``
    and curvature rate ``sig`` (all arrays of one shape).

    Constant curvature uses the exact chord ``u * sinc(k u / 2)`` along the mid-heading;
    ``sig != 0`` uses 5-point Gauss-Legendre quadrature (callers keep ``u`` short).
    """
    half = 0.5 * k0 * u
    chord = u * np.sinc(half / np.pi)
    dx = chord * np.cos(th0 + half)
    dy = chord * np.sin(th0 + half)
    mask = sig != 0.0
    if np.any(mask):
        um, th0m, k0m, sigm = u[mask], th0[mask], k0[mask], sig[mask]
        t = 0.5 * um[:, None] * (1.0 + _GL_NODES[None, :])
        th = th0m[:, None] + k0m[:, None] * t + 0.5 * sigm[:, None] * t * t
        dx[mask] = 0.5 * um * (np.cos(th) @ _GL_WEIGHTS)
        dy[mask] = 0.5 * um * (np.sin(th) @ _GL_WEIGHTS)
    return dx, dy


def _insert_transitions(
    segments: Sequence[Segment], transition_length: float
) -> tuple[tuple[Segment, ...], tuple[int, ...]]:
    """Insert clothoid transitions at curvature jumps (see module docstring).

    Returns the new segments and, for each, the index of the input segment it came
    from (``-1`` for inserted transitions).
    """
    n = len(segments)
    if transition_length <= 0.0 or n < 2:
        return tuple(segments), tuple(range(n))
    joint_lengths = []
    for prev, nxt in zip(segments[:-1], segments[1:]):
        jump = prev.k_end != nxt.k_start
        constant = prev.kind != "clothoid" and nxt.kind != "clothoid"
        joint_lengths.append(
            min(transition_length, 0.5 * prev.length, 0.5 * nxt.length) if jump and constant else 0.0
        )
    out: list[Segment] = []
    source: list[int] = []
    for i, seg in enumerate(segments):
        cut = (joint_lengths[i - 1] if i > 0 else 0.0) + (joint_lengths[i] if i < n - 1 else 0.0)
        out.append(seg if cut == 0.0 else Segment(seg.kind, seg.length - 0.5 * cut, seg.k_start, seg.k_end))
        source.append(i)
        if i < n - 1 and joint_lengths[i] > 0.0:
            out.append(Segment.clothoid(joint_lengths[i], seg.k_end, segments[i + 1].k_start))
            source.append(-1)
    return tuple(out), tuple(source)


# --------------------------------------------------------------------------- #
# Track
# --------------------------------------------------------------------------- #
class Track:
    """Centre line of the ego lane, arc-length parametrised, with lane-frame queries.

    Args:
        segments: Sequence of :class:`Segment`.
        lane_width: Lane width [m], > 0.
        name: Human-readable name.
        start: Start pose ``(x [m], y [m], heading [rad])``.
        transition_length: Clothoid transition length [m] inserted at curvature jumps
            (keyword-only; default 0 = use the segments verbatim). See the module docstring.

    Attributes:
        name, lane_width, start, transition_length: As given.
        input_segments: The segments as given (before transition insertion).
        segments: Segments after automatic transition insertion.
        segment_of_input: For each of ``segments``, the index into ``input_segments``
            it came from (``-1`` for inserted transitions).
        length: Total arc length [m].
        s, x, y, heading, curvature: Dense read-only float64 samples; ``s[i] = i * SAMPLE_STEP``
            except the last sample, which is exactly ``length``. ``heading`` is unwrapped.

    The constructor does not check for self-intersection; :meth:`from_spec` and
    :func:`generate_track` do (see :meth:`self_intersects`).
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        lane_width: float = DEFAULT_LANE_WIDTH,
        name: str = "track",
        start: tuple[float, float, float] = (0.0, 0.0, 0.0),
        *,
        transition_length: float = 0.0,
    ) -> None:
        segments = tuple(segments)
        if not segments:
            raise TrackSpecError("segments: must contain at least one segment, got an empty list")
        for i, seg in enumerate(segments):
            if not isinstance(seg, Segment):
                raise TrackSpecError(
                    f"segments[{i}]: expected a Segment, got {type(seg).__name__}; "
                    "use Track.from_spec() to build a track from a JSON-style dict"
                )
        if not (_is_number(lane_width) and lane_width > 0.0):
            raise TrackSpecError(f"lane_width: must be a number > 0 [m], got {lane_width!r}")
        if len(start) != 3 or not all(_is_number(v) for v in start):
            raise TrackSpecError(f"start: must be 3 finite numbers (x [m], y [m], heading [rad]), got {start!r}")
        if not (_is_number(transition_length) and transition_length >= 0.0):
            raise TrackSpecError(f"transition_length: must be a number >= 0 [m], got {transition_length!r}")

        self.name = str(name)
        self.lane_width = float(lane_width)
        self.start = tuple(float(v) for v in start)
        self.transition_length = float(transition_length)
        self.input_segments: tuple[Segment, ...] = segments
        self.segments, self.segment_of_input = _insert_transitions(segments, self.transition_length)

        self._build_knots()
        self._build_samples()

    # ------------------------------------------------------------------ build
    def _build_knots(self) -> None:
        """Split the segments into knots from which positions are integrated.

        A constant-curvature segment is one knot (closed form). A clothoid is split
        into sub-steps of at most ``_CLOTHOID_MAX_SUBSTEP`` m and
        ``_CLOTHOID_MAX_SUBSTEP_TURN`` rad so quadrature stays far below 1e-6 m.
        """
        x, y, th = self.start
        s0 = 0.0
        ks, kx, ky, kth, kk, ksig = [], [], [], [], [], []
        seg_starts = []
        span_starts = [0.0] * len(self.input_segments)  # where each input segment's span begins
        for i, (seg, src) in enumerate(zip(self.segments, self.segment_of_input)):
            seg_starts.append(s0)
            if src >= 0:
                # An input segment's span starts halfway through the transition before it.
                if i > 0 and self.segment_of_input[i - 1] == -1:
                    span_starts[src] = s0 - 0.5 * self.segments[i - 1].length
                else:
                    span_starts[src] = s0
            sig = seg.curvature_rate
            if sig == 0.0:
                n_sub = 1
            else:
                k_max = max(abs(seg.k_start), abs(seg.k_end))
                step = min(_CLOTHOID_MAX_SUBSTEP, _CLOTHOID_MAX_SUBSTEP_TURN / k_max)
                n_sub = max(1, math.ceil(seg.length / step))
            u = np.arange(n_sub) * (seg.length / n_sub)
            th_sub = th + seg.k_start * u + 0.5 * sig * u * u
            k_sub = seg.k_start + sig * u
            h = np.full(n_sub, seg.length / n_sub)
            dx, dy = _increments(th_sub, k_sub, np.full(n_sub, sig), h)
            x_sub = x + np.concatenate(([0.0], np.cumsum(dx)))
            y_sub = y + np.concatenate(([0.0], np.cumsum(dy)))
            ks.extend((s0 + u).tolist())
            kx.extend(x_sub[:-1].tolist())
            ky.extend(y_sub[:-1].tolist())
            kth.extend(th_sub.tolist())
            kk.extend(k_sub.tolist())
            ksig.extend([sig] * n_sub)
            x, y = float(x_sub[-1]), float(y_sub[-1])
            th = th + seg.heading_change
            s0 += seg.length
        self.length = float(s0)
        self._seg_starts = np.array(seg_starts)
        self._span_starts = np.array(span_starts)
        # Python lists for the fast scalar path, arrays for the vectorised one.
        self._ks, self._kx, self._ky, self._kth, self._kk, self._ksig = ks, kx, ky, kth, kk, ksig
        self._aks, self._akx, self._aky = np.array(ks), np.array(kx), np.array(ky)
        self._akth, self._akk, self._aksig = np.array(kth), np.array(kk), np.array(ksig)

    def _build_samples(self) -> None:
        n_full = int(math.floor(self.length / SAMPLE_STEP + 1e-9))
        s = np.arange(n_full + 1) * SAMPLE_STEP
        if self.length - s[-1] > _SAMPLE_END_TOL:
            s = np.append(s, self.length)
        else:
            s[-1] = self.length
        x, y, heading = self.pose(s)
        curvature = self.curvature_at(s)
        for arr in (s, x, y, heading, curvature):
            arr.setflags(write=False)
        self.s, self.x, self.y, self.heading, self.curvature = s, x, y, heading, curvature
        self._n_samples = len(s)
        self._sl, self._xl, self._yl = s.tolist(), x.tolist(), y.tolist()

    # ---------------------------------------------------------------- queries
    def _eval_scalar(self, s: float) -> tuple[float, float, float, float]:
        """(x, y, heading, curvature) at a scalar ``s`` already clamped to ``[0, length]``."""
        i = bisect.bisect_right(self._ks, s) - 1
        if i < 0:
            i = 0
        u = s - self._ks[i]
        th0, k0, sig = self._kth[i], self._kk[i], self._ksig[i]
        if sig == 0.0:
            half = 0.5 * k0 * u
            chord = u * (1.0 - half * half / 6.0 if abs(half) < 1e-6 else math.sin(half) / half)
            mid = th0 + half
            dx, dy = chord * math.cos(mid), chord * math.sin(mid)
        else:
            dx = dy = 0.0
            for node, weight in _GL_PAIRS:
                t = 0.5 * u * (1.0 + node)
                th = th0 + k0 * t + 0.5 * sig * t * t
                dx += weight * math.cos(th)
                dy += weight * math.sin(th)
            dx *= 0.5 * u
            dy *= 0.5 * u
        return (
            self._kx[i] + dx,
            self._ky[i] + dy,
            th0 + k0 * u + 0.5 * sig * u * u,
            k0 + sig * u,
        )

    def _clamp_scalar(self, s: Any, what: str = "s") -> float:
        s = float(s)
        if not math.isfinite(s):
            raise ValueError(f"Track: {what} must be finite, got {s!r}")
        return min(max(s, 0.0), self.length)

    def _knot_eval(self, s: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clamped ``s`` array, knot index per entry and offset ``u`` into the knot."""
        s = np.asarray(s, dtype=float)
        if not np.all(np.isfinite(s)):
            raise ValueError("Track: s must be finite (got NaN or inf)")
        s = np.clip(s, 0.0, self.length)
        idx = np.clip(np.searchsorted(self._aks, s, side="right") - 1, 0, len(self._ks) - 1)
        return s, idx, s - self._aks[idx]

    def pose(self, s: Any) -> tuple[Any, Any, Any]:
        """Centre-line pose ``(x [m], y [m], heading [rad])`` at arc length ``s``.

        Vectorised: ``s`` may be a scalar (floats are returned) or an array (arrays of the
        same shape are returned). ``s`` is clamped to ``[0, length]``. Exact for straights
        and arcs, accurate to well below 1e-6 m on clothoids. The heading is continuous
        (not wrapped).
        """
        if np.ndim(s) == 0:
            x, y, th, _ = self._eval_scalar(self._clamp_scalar(s))
            return x, y, th
        s, idx, u = self._knot_eval(s)
        th0, k0, sig = self._akth[idx], self._akk[idx], self._aksig[idx]
        dx, dy = _increments(th0, k0, sig, u)
        return self._akx[idx] + dx, self._aky[idx] + dy, th0 + k0 * u + 0.5 * sig * u * u

    def curvature_at(self, s: Any) -> Any:
        """Road curvature [1/m] at ``s`` (vectorised, clamped to ``[0, length]``).

        At a joint the curvature of the following segment is returned.
        """
        if np.ndim(s) == 0:
            return self._eval_scalar(self._clamp_scalar(s))[3]
        _, idx, u = self._knot_eval(s)
        return self._akk[idx] + self._aksig[idx] * u

    def spec_segment_at(self, s: Any) -> Any:
        """Index of the input (spec) segment at ``s`` (vectorised).

        An inserted transition counts half to the segment before and half to the one after,
        i.e. indices follow the route as it was specified.
        """
        s_arr = np.clip(np.asarray(s, dtype=float), 0.0, self.length)
        idx = np.clip(np.searchsorted(self._span_starts, s_arr, side="right") - 1, 0, len(self._span_starts) - 1)
        return int(idx) if np.ndim(s) == 0 else idx

    def lateral_points(self, s: Any, offset: Any) -> tuple[Any, Any]:
        """Points at lateral ``offset`` [m] (``+`` = left) from the centre line at ``s``.

        Vectorised with numpy broadcasting; used to draw road edges and lane markings.
        """
        x, y, th = self.pose(s)
        x = x - np.multiply(offset, np.sin(th))
        y = y + np.multiply(offset, np.cos(th))
        if np.ndim(x) == 0:
            return float(x), float(y)
        return x, y

    def lane_state(
        self,
        x: float,
        y: float,
        yaw: float,
        s_hint: float | None = None,
        window: float = DEFAULT_LANE_STATE_WINDOW,
    ) -> LaneState:
        """Project the point ``(x, y)`` with heading ``yaw`` onto the centre line.

        Args:
            x, y: Position [m].
            yaw: Heading [rad].
            s_hint: Previous progress [m] (pass the previous step's ``s``). If given, the
                squared distance is followed downhill from the sample nearest ``s_hint``,
                never further than ``window`` of arc length. The result is therefore the
                foot point on the hint's own branch of the road: it never jumps to another
                part of the road that passes close by, even one inside the window. Pass
                ``None`` (global nearest sample) after a reset or teleport.
            window: Largest distance [m] of arc length the foot point may lie from
                ``s_hint``, > 0.

        Returns:
            :class:`LaneState`. Points before the start / after the end get ``s = 0`` /
            ``s = length`` and an offset measured perpendicular to the end tangent.
        """
        x = float(x)
        y = float(y)
        if not (math.isfinite(x) and math.isfinite(y) and math.isfinite(yaw)):
            raise ValueError(f"Track.lane_state: x, y, yaw must be finite, got ({x!r}, {y!r}, {yaw!r})")
        n = self._n_samples
        xl, yl, sl = self._xl, self._yl, self._sl
        if s_hint is None:
            dx = self.x - x
            dy = self.y - y
            j = int(np.argmin(dx * dx + dy * dy))
        else:
            if not window > 0.0:
                raise ValueError(f"Track.lane_state: window must be > 0 [m], got {window!r}")
            hint = self._clamp_scalar(s_hint, "lane_state s_hint")
            j = min(int(hint / SAMPLE_STEP + 0.5), n - 1)
            lo = max(0, int((hint - window) / SAMPLE_STEP))
            hi = min(n - 1, int((hint + window) / SAMPLE_STEP) + 1)
            # Walk downhill in squared distance from the hint sample, staying inside the window:
            # this finds the foot point on the hint's branch of the road even when another
            # branch inside the window is closer.
            ex, ey = xl[j] - x, yl[j] - y
            best = ex * ex + ey * ey
            for step in (-1, 1):
                moved = False
                while lo <= j + step <= hi:
                    ex, ey = xl[j + step] - x, yl[j + step] - y
                    d2 = ex * ex + ey * ey
                    if d2 >= best:
                        break
                    best, j, moved = d2, j + step, True
                if moved:
                    break

        # Project onto the chords to the neighbouring samples.
        best_d2 = math.inf
        s = sl[j]
        for a in (j - 1, j):
            if a < 0 or a + 1 >= n:
                continue
            ax, ay = xl[a], yl[a]
            ex, ey = xl[a + 1] - ax, yl[a + 1] - ay
            e2 = ex * ex + ey * ey
            t = ((x - ax) * ex + (y - ay) * ey) / e2 if e2 > 0.0 else 0.0
            t = min(max(t, 0.0), 1.0)
            px, py = ax + t * ex - x, ay + t * ey - y
            d2 = px * px + py * py
            if d2 < best_d2:
                best_d2 = d2
                s = sl[a] + t * (sl[a + 1] - sl[a])

        # Newton refinement on the exact curve: drive the along-track residual to zero.
        length = self.length
        for _ in range(_NEWTON_MAX_ITER):
            cx, cy, th, k = self._eval_scalar(s)
            c, sn = math.cos(th), math.sin(th)
            rx, ry = x - cx, y - cy
            along = c * rx + sn * ry
            if abs(along) <= _NEWTON_TOL:
                break
            offset = c * ry - sn * rx
            ds = along / max(1.0 - k * offset, _NEWTON_MIN_DENOM)
            ds = min(max(ds, -SAMPLE_STEP), SAMPLE_STEP)
            s_new = min(max(s + ds, 0.0), length)
            if s_new == s:  # pinned at an end of the track
                break
            s = s_new
        else:
            cx, cy, th, k = self._eval_scalar(s)
            c, sn = math.cos(th), math.sin(th)
        offset = c * (y - cy) - sn * (x - cx)
        return LaneState(
            s=s,
            offset=offset,
            heading_error=_wrap(yaw - th),
            curvature=k,
            road_heading=_wrap(th),
        )

    # ------------------------------------------------------ self-intersection
    def _find_self_intersection(self, clearance: float) -> tuple[int, int, float] | None:
        """First spec segment that comes within ``2 * clearance`` of an earlier,
        non-neighbouring part of the road.

        Pairs of points less than ``pi * clearance`` of arc length apart are neighbours
        (a curve of radius >= clearance never brings them closer than ``2 * clearance``)
        and are ignored.

        Returns:
            ``(segment, other_segment, min_distance)`` or ``None``.
        """
        threshold = 2.0 * clearance
        gap = math.pi * clearance
        if self.length <= gap:
            return None
        n = max(2, math.ceil(self.length / _INTERSECTION_STEP) + 1)
        ss = np.linspace(0.0, self.length, n)
        xs, ys, _ = self.pose(ss)
        limit = np.searchsorted(ss, ss - gap, side="left")  # earlier points i < limit[j] are far enough
        first = int(np.searchsorted(limit, 1))  # first row with any candidate
        row_min = np.full(n, np.inf)
        row_arg = np.zeros(n, dtype=int)
        for r0 in range(first, n, _INTERSECTION_CHUNK):
            r1 = min(n, r0 + _INTERSECTION_CHUNK)
            m = int(limit[r1 - 1])
            d2 = (xs[r0:r1, None] - xs[None, :m]) ** 2 + (ys[r0:r1, None] - ys[None, :m]) ** 2
            d2[np.arange(m)[None, :] >= limit[r0:r1, None]] = np.inf
            row_arg[r0:r1] = np.argmin(d2, axis=1)
            row_min[r0:r1] = d2[np.arange(r1 - r0), row_arg[r0:r1]]
        hits = np.flatnonzero(row_min < threshold * threshold)
        if hits.size == 0:
            return None
        seg_of_row = self.spec_segment_at(ss)
        segment = int(seg_of_row[hits[0]])
        rows = hits[seg_of_row[hits] == segment]
        worst = rows[np.argmin(row_min[rows])]
        other = int(seg_of_row[row_arg[worst]])
        return segment, other, float(math.sqrt(row_min[worst]))

    def self_intersects(self, clearance: float) -> int | None:
        """Index of the first spec segment that comes within ``2 * clearance`` [m] of a
        non-neighbouring part of the road, else ``None``.

        ``clearance`` is the half-width of the road footprint around the centre line
        (default used by specs: ``2 * lane_width``: two lanes plus shoulders). Points less
        than ``pi * clearance`` of arc length apart are considered neighbours.
        """
        if not (_is_number(clearance) and clearance > 0.0):
            raise ValueError(f"Track.self_intersects: clearance must be > 0 [m], got {clearance!r}")
        hit = self._find_self_intersection(float(clearance))
        return None if hit is None else hit[0]

    def _check_world_reach(self, where: str = "") -> None:
        """Raise TrackSpecError naming the first spec segment that leaves the world (cheap: dense samples)."""
        outside = np.flatnonzero(np.maximum(np.abs(self.x), np.abs(self.y)) > WORLD_REACH)
        if outside.size:
            i = outside[0]
            raise TrackSpecError(
                f"segments[{self.spec_segment_at(self.s[i])}]: the road leaves the world at ({self.x[i]:.0f} m, "
                f"{self.y[i]:.0f} m); it must stay within +-{WORLD_REACH:g} m of the origin along x and y: "
                f"move its start, shorten it or turn it back{where}")

    # ------------------------------------------------------------------ specs
    def to_spec(self) -> dict[str, Any]:
        """JSON-serialisable spec that :meth:`from_spec` turns back into this track.

        The *input* segments are stored together with ``transition_length``, so the
        transitions are re-created identically.
        """
        return {
            "name": self.name,
            "lane_width": self.lane_width,
            "start": {"x": self.start[0], "y": self.start[1], "heading_deg": math.degrees(self.start[2])},
            "transition_length": self.transition_length,
            "segments": [seg.to_spec() for seg in self.input_segments],
        }

    @classmethod
    def from_spec(
        cls,
        spec: Mapping[str, Any],
        source: str = "<spec>",
        transition_length: float | None = None,
        clearance: float | None = None,
    ) -> Track:
        """Build and validate a track from a JSON-style spec (format: module docstring).

        Args:
            spec: The spec dict.
            source: Where the spec came from; appended to error messages.
            transition_length: Clothoid transition length [m]; ``None`` uses the spec's
                ``"transition_length"`` if present, else :data:`DEFAULT_TRANSITION_LENGTH`
                (10 m). 0 disables transitions.
            clearance: Half-width [m] of the road footprint for the self-intersection check
                (see :meth:`self_intersects`); ``None`` = ``2 * lane_width``; 0 skips the check.

        Raises:
            TrackSpecError: Naming the offending field, e.g. ``segments[1].radius``; also when
                the route is shorter than ``MIN_ROUTE_LENGTH`` or longer than ``MAX_ROUTE_LENGTH``
                (checked before anything is built) or leaves the world (``WORLD_REACH``).
        """
        from steerloop.sim.track.spec import track_from_spec

        return track_from_spec(spec, source, transition_length, clearance, cls=cls)

    @classmethod
    def from_json(cls, path: str | Path, **kwargs: Any) -> Track:
        """Load a track spec from a JSON file (extra keyword arguments go to :meth:`from_spec`).

        If the spec has no ``"name"``, the file stem is used.

        Raises:
            FileNotFoundError: The file does not exist (the message names the path).
            TrackSpecError: Invalid JSON or invalid content (the message names the file).
        """
        from steerloop.sim.track.spec import track_from_json

        return track_from_json(path, cls=cls, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Track(name={self.name!r}, length={self.length:.1f} m, segments={len(self.segments)}, "
            f"lane_width={self.lane_width:g} m)"
        )


def _is_number(value: Any) -> bool:
    """True for finite real numbers (bools excluded)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value)
    )

