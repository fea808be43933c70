"""Track specs: the JSON format of a route and its validation (every error names the field).

::

    {"name": "s-bend", "lane_width": 3.7,
     "start": {"x": 0, "y": 0, "heading_deg": 0},          # optional
     "transition_length": 10,                               # optional [m]
     "segments": [{"type": "straight", "length": 40},
                  {"type": "arc", "radius": 30, "angle": 90},      # degrees, + = left
                  {"type": "clothoid", "length": 10, "k_start": 0.0333, "k_end": 0},
                  {"type": "straight", "length": 30}]}

Unknown keys (e.g. ``"comment"``) are ignored.
Unknown keys are refused with a close-match suggestion (``comment`` and ``description`` are
allowed for notes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence


from steerloop.sim.track.geometry import (
    CLEARANCE_LANE_WIDTHS,
    DEFAULT_LANE_WIDTH,
    DEFAULT_TRANSITION_LENGTH,
    SEGMENT_KINDS,
    WORLD_REACH,
    Segment,
    Track,
    TrackSpecError,
    _is_number,
    check_route_length,
)
from steerloop.errors import check_keys, parse_json, suggest


TRACKS_DIR = Path(__file__).resolve().parents[1] / "tracks"  # shipped example specs
SPEC_KEYS = ("name", "lane_width", "start", "transition_length", "segments", "comment", "description")
START_KEYS = ("x", "y", "heading_deg")
SEGMENT_KEYS = {"straight": ("length",), "arc": ("radius", "angle"), "clothoid": ("length", "k_start", "k_end")}


def track_from_spec(spec: Mapping[str, Any], source: str = "<spec>", transition_length: float | None = None,
                    clearance: float | None = None, *, cls: type[Track] = Track) -> Track:
    """The body of :meth:`Track.from_spec` (see its docstring)."""
    where = f" (in {source})"
    if not isinstance(spec, Mapping):
        raise TrackSpecError(
            f"spec: must be a JSON object with a 'segments' list, got {type(spec).__name__}{where}"
        )
    check_keys(spec, SPEC_KEYS, f"track spec{where}", TrackSpecError)
    name = spec.get("name", "track")
    if not isinstance(name, str):
        raise TrackSpecError(f"name: must be a string, got {name!r}{where}")
    lane_width = _spec_number(spec, "lane_width", "lane_width", where, default=DEFAULT_LANE_WIDTH)
    if lane_width <= 0.0:
        raise TrackSpecError(f"lane_width: must be > 0 [m], got {lane_width:g}{where}")

    start = spec.get("start", {})
    if not isinstance(start, Mapping):
        raise TrackSpecError(
            f'start: must be an object like {{"x": 0, "y": 0, "heading_deg": 0}}, got {start!r}{where}'
        )
    start_pose = (
        _spec_number(start, "x", "start.x", where, default=0.0),
        _spec_number(start, "y", "start.y", where, default=0.0),
        math.radians(_spec_number(start, "heading_deg", "start.heading_deg", where, default=0.0)),
    )
    check_keys(start, START_KEYS, f"start{where}", TrackSpecError)

    if transition_length is None:
        transition_length = _spec_number(
            spec, "transition_length", "transition_length", where, default=DEFAULT_TRANSITION_LENGTH
        )
    if not (_is_number(transition_length) and transition_length >= 0.0):
        raise TrackSpecError(f"transition_length: must be >= 0 [m], got {transition_length!r}{where}")

    if "segments" not in spec:
        raise TrackSpecError(
            'segments: missing required field; add a non-empty list such as '
            f'[{{"type": "straight", "length": 40}}]{where}'
        )
    raw = spec["segments"]
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise TrackSpecError(f"segments: must be a list of segment objects, got {type(raw).__name__}{where}")
    if len(raw) == 0:
        raise TrackSpecError(f"segments: must contain at least one segment, got an empty list{where}")
    segments = [_parse_segment(item, i, where) for i, item in enumerate(raw)]
    try:
        check_route_length(math.fsum(seg.length for seg in segments), "segments")
    except ValueError as error:
        raise TrackSpecError(f"{error} (the sum of the segment lengths){where}") from None
    for axis, value in zip("xy", start_pose[:2]):
        if abs(value) > WORLD_REACH:
            raise TrackSpecError(f"start.{axis}: must be within +-{WORLD_REACH:g} m of the origin (the world's "
                                 f"drivable part), got {value:g}{where}")

    track = cls(segments, lane_width, name, start_pose, transition_length=float(transition_length))
    track._check_world_reach(where)

    if clearance is None:
        clearance = CLEARANCE_LANE_WIDTHS * lane_width
    if not (_is_number(clearance) and clearance >= 0.0):
        raise ValueError(f"Track.from_spec: clearance must be >= 0 [m] or None, got {clearance!r}")
    if clearance > 0.0:
        hit = track._find_self_intersection(float(clearance))
        if hit is not None:
            seg, other, dist = hit
            raise TrackSpecError(
                f"segments[{seg}]: the road crosses or touches itself (comes within {dist:.2f} m of "
                f"segments[{other}]); non-neighbouring parts of the road must stay at least "
                f"{2.0 * clearance:.2f} m apart (2 x clearance {clearance:.2f} m). Change the lengths, "
                f"radii or angles so the route does not come back near itself{where}"
            )
    return track


def track_from_json(path: str | Path, *, cls: type[Track] = Track, **kwargs: Any) -> Track:
    """The body of :meth:`Track.from_json` (see its docstring)."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in TRACKS_DIR.glob("*.json")) if TRACKS_DIR.is_dir() else []
        raise FileNotFoundError(
            f"Track spec file not found: '{path}'. Shipped specs in {TRACKS_DIR}: "
            f"{', '.join(shipped) or 'none'}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrackSpecError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    spec = parse_json(text, str(path), TrackSpecError)
    if isinstance(spec, dict) and "name" not in spec:
        spec = {**spec, "name": path.stem}
    return track_from_spec(spec, source=str(path), cls=cls, **kwargs)


def _spec_number(obj: Mapping[str, Any], key: str, field: str, where: str, default: float | None = None) -> float:
    """Read a finite number ``obj[key]``; errors name ``field``."""
    if key not in obj:
        if default is None:
            raise TrackSpecError(f"{field}: missing required field{where}")
        return float(default)
    value = obj[key]
    if not _is_number(value):
        raise TrackSpecError(f"{field}: must be a finite number, got {value!r}{where}")
    return float(value)


def _parse_segment(item: Any, i: int, where: str) -> Segment:
    field = f"segments[{i}]"
    if not isinstance(item, Mapping):
        raise TrackSpecError(
            f'{field}: must be an object like {{"type": "straight", "length": 40}}, got {item!r}{where}'
        )
    if "type" not in item:
        raise TrackSpecError(
            f"{field}.type: missing required field; valid types are "
            f"{', '.join(repr(k) for k in SEGMENT_KINDS)}{where}"
        )
    kind = item["type"]
    if kind not in SEGMENT_KINDS:
        raise TrackSpecError(
            f"{field}.type: unknown segment type {kind!r}{suggest(kind, SEGMENT_KINDS)}; valid types are "
            f"{', '.join(repr(k) for k in SEGMENT_KINDS)}{where}"
        )
    check_keys(item, ("type", *SEGMENT_KEYS[kind]), f"{field} ({kind}){where}", TrackSpecError)
    if kind == "straight":
        length = _spec_number(item, "length", f"{field}.length", where)
        if length <= 0.0:
            raise TrackSpecError(f"{field}.length: must be > 0, got {length:g}{where}")
        return Segment.straight(length)
    if kind == "arc":
        radius = _spec_number(item, "radius", f"{field}.radius", where)
        if radius <= 0.0:
            raise TrackSpecError(f"{field}.radius: must be > 0, got {radius:g}{where}")
        angle = _spec_number(item, "angle", f"{field}.angle", where)
        if angle == 0.0:
            raise TrackSpecError(
                f"{field}.angle: must be non-zero (degrees, + = left turn), got {angle:g}{where}"
            )
        return Segment.arc(radius, angle)
    length = _spec_number(item, "length", f"{field}.length", where)
    if length <= 0.0:
        raise TrackSpecError(f"{field}.length: must be > 0, got {length:g}{where}")
    k_start = _spec_number(item, "k_start", f"{field}.k_start", where)
    k_end = _spec_number(item, "k_end", f"{field}.k_end", where)
    return Segment.clothoid(length, k_start, k_end)


