"""The driving-log format: its version, the per-step series (the one definition the writer and the
validator share), file names, manifest reading and the value checks (docs/driving-log.md)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from steerloop.errors import SteerloopError


SCHEMA_VERSION = "1.0.0"
"""Semantic version of the on-disk format.  Readers refuse a newer MAJOR."""

MANIFEST = "manifest.json"
FRAME_COMPRESSION = "gzip"
FRAME_COMPRESSION_LEVEL = 1
_LIBVER = ("earliest", "v110")
_EPISODE_RE = re.compile(r"^episode_(\d{6,})\.h5$")
_REQUIRED_ATTRS = ("track", "seed", "condition")
_RESERVED_ATTRS = ("schema_version", "episode")
_CAMERA_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_DEFAULT_MAX_OPEN = 64


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """Schema of one per-step scalar series.

    ``low``/``high`` are inclusive bounds (``None`` = unbounded); ``allowed``
    restricts an integer series to a set of codes.  Floating-point series must
    always be finite.
    """

    dtype: str
    unit: str
    description: str
    low: float | None = None
    high: float | None = None
    allowed: tuple[int, ...] | None = None

    def range_text(self) -> str:
        """Human-readable valid range, e.g. ``[-1, 1]`` or ``{0, 1, 2}``."""
        if self.allowed is not None:
            return "{" + ", ".join(str(v) for v in self.allowed) + "}"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"[{low}, {high}]"


SCALAR_FIELDS: Mapping[str, FieldSpec] = MappingProxyType(
    {
        "steering": FieldSpec("float32", "1", "executed normalised steering command", -1.0, 1.0),
        "expert_steering": FieldSpec("float32", "1", "clean expert steering label", -1.0, 1.0),
        "speed": FieldSpec("float32", "m/s", "vehicle speed", 0.0, None),
        "throttle": FieldSpec("float32", "1", "executed normalised throttle", -1.0, 1.0),
        "x": FieldSpec("float64", "m", "world x position"),
        "y": FieldSpec("float64", "m", "world y position"),
        "yaw": FieldSpec("float64", "rad", "world heading"),
        "lateral_offset": FieldSpec("float32", "m", "signed offset from lane centre, + = left"),
        "heading_error": FieldSpec("float32", "rad", "heading relative to the lane direction"),
        "progress": FieldSpec("float64", "m", "arc length travelled along the track"),
        "curvature": FieldSpec("float32", "1/m", "signed track curvature at the vehicle"),
        "time": FieldSpec("float64", "s", "simulation time"),
        "wheel_angle": FieldSpec("float32", "rad", "front wheel steering angle"),
        "perturbation_phase": FieldSpec(
            "int8", "code", "0 none, 1 perturbation acting, 2 recovery window", allowed=(0, 1, 2)
        ),
    }
)
"""The single definition of the per-step scalar series (writer and validator)."""


class LogError(SteerloopError):
    """Problem with a driving-log directory or one of its episode files."""


class CorruptEpisodeError(LogError):
    """An episode file is missing, truncated or does not match its checksum."""




def episode_file(index: int) -> str:
    """File name of episode ``index``, e.g. ``episode_000012.h5``."""
    return f"episode_{int(index):06d}.h5"


def _parse_version(text: Any) -> tuple[int, int, int]:
    if not isinstance(text, str):
        raise ValueError(f"schema_version must be a string like '1.0.0', got {text!r}")
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text.strip())
    if match is None:
        raise ValueError(f"schema_version {text!r} is not a MAJOR.MINOR.PATCH version")
    return int(match[1]), int(match[2]), int(match[3])


def _check_version(text: Any, where: str) -> None:
    """Raise LogError if ``text`` is malformed or of a newer major version."""
    try:
        major = _parse_version(text)[0]
    except ValueError as exc:
        raise LogError(f"{where}: {exc}; the manifest is damaged, re-record the dataset") from None
    supported = _parse_version(SCHEMA_VERSION)[0]
    if major > supported:
        raise LogError(
            f"{where}: schema_version {text} is newer than this software supports "
            f"(schema {SCHEMA_VERSION}, major version {supported}); upgrade steerloop to read it"
        )
    if major < supported:
        raise LogError(
            f"{where}: schema_version {text} is an older major version than the supported "
            f"{SCHEMA_VERSION}; re-record the dataset with this version of steerloop"
        )


def _json_normalise(value: Any, what: str) -> Any:
    """Round-trip ``value`` through strict JSON (so comparisons match disk)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (finite numbers only): {exc}") from None


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))




def _attr_value(value: Any) -> Any:
    """Map a JSON value onto an HDF5 attribute value (see module docstring)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    return _dumps(value)


def _check_series(name: str, spec: FieldSpec, data: np.ndarray, length: int | None) -> list[str]:
    """Problems of one scalar series against its schema entry (no file prefix)."""
    problems = []
    if data.dtype != np.dtype(spec.dtype):
        problems.append(f"{name} has dtype {data.dtype}, expected {spec.dtype}")
    if data.ndim != 1 or (length is not None and data.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        problems.append(f"{name} has shape {data.shape}, expected {want}")
        return problems
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            problems.append(f"{name} has {bad} non-finite values (NaN or inf)")
        values = data[np.isfinite(data)]
    else:
        values = data
    if spec.allowed is not None:
        bad = int(np.count_nonzero(~np.isin(values, spec.allowed)))
        if bad:
            problems.append(f"{name} has {bad} values outside {spec.range_text()}")
    else:
        outside = np.zeros(values.shape, dtype=bool)
        if spec.low is not None:
            outside |= values < spec.low
        if spec.high is not None:
            outside |= values > spec.high
        bad = int(np.count_nonzero(outside))
        if bad:
            problems.append(f"{name} has {bad} values outside {spec.range_text()}")
    return problems


def _check_frame_shape(
    camera: str, dtype: np.dtype, shape: tuple[int, ...], length: int, resolution: Sequence[int]
) -> list[str]:
    problems = []
    if dtype != np.uint8:
        problems.append(f"frames/{camera} has dtype {dtype}, expected uint8")
    expected = (length, int(resolution[0]), int(resolution[1]), 3)
    if tuple(shape) != expected:
        problems.append(f"frames/{camera} has shape {tuple(shape)}, expected {expected}")
    return problems


def _read_manifest(path: str) -> dict:
    """Load and sanity-check ``manifest.json``; LogError naming the file otherwise."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise LogError(
            f"{path} is not a driving log: {MANIFEST} is missing; "
            "point to a directory created by `steerloop record`"
        )
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except json.JSONDecodeError as exc:
        raise LogError(
            f"{manifest_path} is not valid JSON ({exc}); it was edited or damaged outside "
            "the recorder — restore it or re-record the dataset"
        ) from None
    except OSError as exc:
        raise LogError(f"cannot read {manifest_path}: {exc}") from None
    if not isinstance(manifest, dict):
        raise LogError(f"{manifest_path} must contain a JSON object, got {type(manifest).__name__}")
    _check_version(manifest.get("schema_version"), manifest_path)
    for key, kind in (("episodes", dict), ("cameras", list), ("resolution", list)):
        if not isinstance(manifest.get(key), kind):
            raise LogError(
                f"{manifest_path}: field {key!r} is missing or not a {kind.__name__}; "
                "the manifest is damaged — re-record the dataset"
            )
    return manifest
