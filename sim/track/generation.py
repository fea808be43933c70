"""Procedural routes: seeded random sequences of straights and arcs that stay in the world
and never come back near themselves (:func:`generate_track`)."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from steerloop.sim.track.geometry import (
    CLEARANCE_LANE_WIDTHS,
    DEFAULT_LANE_WIDTH,
    DEFAULT_TRANSITION_LENGTH,
    Segment,
    Track,
    _is_number,
    check_route_length,
)


# --------------------------------------------------------------------------- #
# Procedural generation constants
# --------------------------------------------------------------------------- #
_GEN_START_STRAIGHT = (20.0, 30.0)  # [m] length range of the first straight (the car starts there)
_GEN_RUN_OUT = 30.0  # [m] final straight run-out
_GEN_ALTERNATE_PROB = 0.7  # [-] probability that a turn goes the other way than the previous one
_GEN_MAX_ROUTE_HEADING = math.radians(135.0)  # [rad] |cumulative heading| bound (limits spirals)
_GEN_MAX_ATTEMPTS = 100  # [-] candidates tried before giving up



def _check_range(name: str, value: Any, lo_min: float, hi_max: float = math.inf) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"generate_track: {name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (lo_min < lo <= hi <= hi_max):
        raise ValueError(
            f"generate_track: {name} must satisfy {lo_min:g} < min <= max <= {hi_max:g}, got {value!r}"
        )
    return lo, hi


def _random_route(
    rng: np.random.Generator,
    length: float,
    min_radius: float,
    max_radius: float,
    straight_range: tuple[float, float],
    angle_range_deg: tuple[float, float],
) -> tuple[list[Segment], int, int]:
    """Draw one candidate route; returns (segments, n_left_turns, n_right_turns)."""
    segments = [Segment.straight(rng.uniform(*_GEN_START_STRAIGHT))]
    total = segments[0].length
    heading = 0.0
    last_sign = 1.0 if rng.random() < 0.5 else -1.0
    n_left = n_right = 0
    while total < length:
        radius = rng.uniform(min_radius, max_radius)
        angle = math.radians(rng.uniform(*angle_range_deg))
        sign = -last_sign if rng.random() < _GEN_ALTERNATE_PROB else last_sign
        if abs(heading + sign * angle) > _GEN_MAX_ROUTE_HEADING and heading != 0.0:
            sign = -math.copysign(1.0, heading)  # turn back towards the initial direction
        segments.append(Segment.arc(radius, math.degrees(sign * angle)))
        total += segments[-1].length
        heading += sign * angle
        last_sign = sign
        n_left += sign > 0
        n_right += sign < 0
        if total < length:
            segments.append(Segment.straight(rng.uniform(*straight_range)))
            total += segments[-1].length
    if segments[-1].kind == "straight":
        segments[-1] = Segment.straight(segments[-1].length + _GEN_RUN_OUT)
    else:
        segments.append(Segment.straight(_GEN_RUN_OUT))
    return segments, n_left, n_right


def generate_track(
    seed: int,
    length: float = 400.0,
    lane_width: float = DEFAULT_LANE_WIDTH,
    min_radius: float = 25.0,
    max_radius: float = 120.0,
    *,
    straight_range: tuple[float, float] = (10.0, 60.0),
    angle_range_deg: tuple[float, float] = (20.0, 120.0),
    transition_length: float = DEFAULT_TRANSITION_LENGTH,
    clearance: float | None = None,
    max_attempts: int = _GEN_MAX_ATTEMPTS,
) -> Track:
    """Procedural, seeded route (same seed -> identical track).

    The route starts with a 20-30 m straight (where the car starts), then alternates
    arcs (radius uniform in ``[min_radius, max_radius]``, angle uniform in
    ``angle_range_deg``) and straights (length uniform in ``straight_range``) until
    ``length`` is reached, and ends with a 30 m straight run-out (half a transition of
    which is used by the last clothoid transition). Turns alternate direction with
    probability 0.7 and the cumulative heading is kept within +-135 deg, so routes
    mix left and right turns and do not spiral. Clothoid transitions of
    ``transition_length`` are inserted at every curvature change, so ``|curvature|``
    never exceeds ``1 / min_radius``.

    Candidates that come back within ``2 * clearance`` of themselves (default clearance
    ``2 * lane_width``) or that have at least two turns all in the same direction are
    rejected; retries use ``np.random.default_rng([seed, attempt])``, so the result is
    deterministic. The first attempt uses ``np.random.default_rng(seed)``.

    Args:
        seed: Non-negative integer seed (see :func:`split_seed`).
        length: Route length [m] before the run-out, in ``[MIN_ROUTE_LENGTH, MAX_ROUTE_LENGTH]``
            (checked first, so an impossible length costs nothing). The route may still leave
            the world (``WORLD_REACH``); the scene refuses it then.
        lane_width: Lane width [m], > 0.
        min_radius, max_radius: Arc radius range [m], ``0 < min_radius <= max_radius``.
        straight_range: ``(min, max)`` length of intermediate straights [m].
        angle_range_deg: ``(min, max)`` absolute turning angle of an arc [deg], within (0, 180].
        transition_length: Clothoid transition length [m], >= 0.
        clearance: Half-width of the road footprint for the self-intersection check [m].
        max_attempts: Candidates to try before raising ``RuntimeError``.

    Returns:
        A :class:`Track` named ``f"proc-{seed}"``.
    """
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"generate_track: seed must be an integer, got {seed!r}") from None
    if seed < 0:
        raise ValueError(f"generate_track: seed must be >= 0, got {seed}")
    check_route_length(length, "generate_track: length")
    if not (_is_number(lane_width) and lane_width > 0.0):
        raise ValueError(f"generate_track: lane_width must be a number > 0 [m], got {lane_width!r}")
    if not (_is_number(min_radius) and min_radius > 0.0):
        raise ValueError(f"generate_track: min_radius must be a number > 0 [m], got {min_radius!r}")
    if not _is_number(max_radius):
        raise ValueError(f"generate_track: max_radius must be a number [m], got {max_radius!r}")
    if min_radius > max_radius:
        raise ValueError(
            f"generate_track: min_radius ({min_radius:g} m) must be <= max_radius ({max_radius:g} m)"
        )
    straight_range = _check_range("straight_range", straight_range, 0.0)
    angle_range_deg = _check_range("angle_range_deg", angle_range_deg, 0.0, 180.0)
    if not (_is_number(transition_length) and transition_length >= 0.0):
        raise ValueError(f"generate_track: transition_length must be a number >= 0 [m], got {transition_length!r}")
    if clearance is None:
        clearance = CLEARANCE_LANE_WIDTHS * lane_width
    if not (_is_number(clearance) and clearance > 0.0):
        raise ValueError(f"generate_track: clearance must be a number > 0 [m] or None, got {clearance!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"generate_track: max_attempts must be an integer >= 1, got {max_attempts!r}")

    for attempt in range(max_attempts):
        rng = np.random.default_rng(seed if attempt == 0 else [seed, attempt])
        segments, n_left, n_right = _random_route(
            rng, float(length), float(min_radius), float(max_radius), straight_range, angle_range_deg
        )
        if n_left + n_right >= 2 and (n_left == 0 or n_right == 0):
            continue
        track = Track(segments, lane_width, f"proc-{seed}", transition_length=float(transition_length))
        if track._find_self_intersection(float(clearance)) is None:
            return track
    raise RuntimeError(
        f"generate_track: no non-self-intersecting route found for seed {seed} in {max_attempts} attempts; "
        "increase max_attempts, reduce length or clearance, or use larger radii"
    )

