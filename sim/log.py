"""Durable, reproducible on-disk driving logs.

A *driving log* is a directory holding one HDF5 file per episode plus a
``manifest.json`` describing the recording::

    <out>/
        manifest.json
        episode_000000.h5
        episode_000001.h5
        ...

Episode file schema (schema version :data:`SCHEMA_VERSION`)
----------------------------------------------------------
Every episode file is a plain HDF5 file readable with ``h5py`` alone.  For an
episode of ``N`` steps it contains

* ``frames/<camera>``: ``uint8`` array of shape ``(N, H, W, 3)`` (RGB), one
  dataset per camera listed in the manifest.  Stored with chunks of shape
  ``(1, H, W, 3)`` so a window of ``T`` steps decodes only ``T`` chunks, and
  compressed losslessly with gzip level 1 (see *Compression* below).
* one 1-D dataset of length ``N`` per entry of :data:`SCALAR_FIELDS` (name,
  dtype, unit and valid range are defined there; each dataset also carries
  ``unit`` and ``description`` attributes).
* root attributes: ``schema_version``, ``episode`` (index), ``track``,
  ``seed``, ``condition`` and any extra metadata given by the recorder.
  Strings, booleans, integers and floats are stored natively; anything else
  (``None``, lists, dicts such as a track spec) is stored as a JSON string.
  The manifest keeps the original JSON values under ``episodes[i].attrs``.

Durability
----------
An episode is serialised in memory, written to ``episode_XXXXXX.h5.tmp``,
fsynced and renamed into place with :func:`os.replace`; only then is the
manifest rewritten (temporary file + fsync + ``os.replace`` + directory
fsync).  Killing the process at any moment therefore leaves every episode
listed in the manifest intact.  Leftovers of an interrupted write (``*.tmp``
files, or a renamed episode file the manifest does not list yet) are ignored
by the reader, reported as notes by :func:`validate` and re-recorded on
resume; the writer removes stale ``*.tmp`` files when it opens the directory.
Several writer processes may share one directory: manifest updates are
serialised with an advisory lock on the directory and a ``*.tmp`` file being
written is locked, so it is never mistaken for a stale one (POSIX only).

Integrity
---------
Every listed episode's size and sha256 are recorded in the manifest.
:class:`DrivingLog` ``(verify=True)`` (what training and offline evaluation
use) checks every episode before anything is read, and the writer's
:meth:`DrivingLogWriter.completed` counts an episode as done only if it
passes the same check, so a resumed recording re-records damaged episodes.
A successful check is remembered for the life of the process, keyed by the
file's device, inode, size, mtime, ctime and the expected checksum: checking
an unchanged file again costs one ``stat``.  A file modified less than
:data:`RACY_WINDOW_NS` before its check is re-hashed at every use, because a
second change within one timestamp tick would keep its mtime.

Reproducibility
---------------
Files are written with the oldest HDF5 format (``libver=("earliest",
"v110")``), without object timestamps and with objects created in sorted
order, so identical content always yields byte-identical episode files (and
identical sha256 in the manifest), whichever process wrote them.  The manifest
is written with sorted keys; two recordings of the same content differ only in
``created``.

Compression
-----------
Chosen by measuring write throughput (h5py 3.16 / HDF5 2.0, one core) on
66x200 road-like renders (sky gradient, perspective checker grass, shaded
road, anti-aliased lane lines), per frame:

==========  ===========  =========
filter      write time   size
==========  ===========  =========
none        0.04 ms      39.6 KB
lzf         0.14 ms      6.1 KB
gzip 1      0.16 ms      4.0 KB
gzip 2      0.17 ms      3.9 KB
gzip 4      0.32 ms      3.7 KB
==========  ===========  =========

On flat-shaded frames gzip 1 is both faster and smaller than lzf (0.08 ms,
1.1 KB vs 0.10 ms, 1.8 KB); only on sensor-noise-like content (+-1 grey level
everywhere) does it slow to ~0.6 ms (lzf 0.3 ms).  gzip 1 is used: well
within the 0.5 ms/frame budget on rendered frames, ~35 % smaller than lzf
and, unlike lzf, readable by any HDF5 tool.  Byte shuffling is not used: it
is a no-op for 1-byte elements.  The complete write path
(:meth:`EpisodeBuffer.append` + :meth:`DrivingLogWriter.write_episode`,
including sha256, fsync and the manifest update) costs ~0.22 ms per 66x200
frame, ~3.9 KB per frame on disk.

Manifest
--------
``manifest.json`` holds ``schema_version``, ``created`` (set once),
``software`` (python, numpy, h5py, hdf5, steerloop versions), ``config``
(the recording command's configuration), ``cameras``, ``resolution``
``[H, W]``, ``suite``, ``seeds``, ``extra``, ``frame_storage`` (chunking and
filter), ``bytes_per_frame`` (mean compressed frame size) and ``episodes``:
``{"<index>": {"file", "length", "sha256", "bytes", "frame_bytes", "attrs"}}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import h5py
import numpy as np

from steerloop.errors import SteerloopError
from steerloop.files import TMP_SUFFIX, atomic_write, fsync_dir, software_versions, write_all

try:  # advisory locks; unavailable on Windows, where a directory has one writer.
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "SCALAR_FIELDS",
    "FieldSpec",
    "FRAME_COMPRESSION",
    "FRAME_COMPRESSION_LEVEL",
    "MANIFEST",
    "LogError",
    "CorruptEpisodeError",
    "EpisodeBuffer",
    "DrivingLogWriter",
    "DrivingLog",
    "episode_file",
    "validate",
]

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
VERIFIED_CACHE_SIZE = 16384  # entries (~0.2 KB each) of the in-process checksum-verification cache
RACY_WINDOW_NS = 2_000_000_000  # [ns] files modified this recently are re-hashed at every use (FAT: 2 s mtime ticks)
_VERIFIED: OrderedDict[tuple, None] = OrderedDict()  # stat identity + expected sha256 of files that matched


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

"""Alias of :data:`SCALAR_FIELDS` kept for existing callers."""


class LogError(SteerloopError):
    """Problem with a driving-log directory or one of its episode files."""


class CorruptEpisodeError(LogError):
    """An episode file is missing, truncated or does not match its checksum."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


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


@contextlib.contextmanager
def _dir_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock on a directory (serialises manifest updates)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_key(path: str, sha256: str) -> tuple:
    """What identifies one state of a file for the verification cache (raises OSError)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256)


def _file_problem(path: str, size: int, sha256: str) -> str | None:
    """Why ``path`` is not the file the manifest lists (``size`` bytes, checksum ``sha256``), or None.

    Successes are cached (see *Integrity* in the module docstring): an unchanged file is
    hashed once per process.  Never caches a file that changed while it was hashed or that
    was modified within :data:`RACY_WINDOW_NS`.
    """
    try:
        key = _file_key(path, sha256)
    except OSError:
        return "file is missing"
    if key in _VERIFIED:
        _VERIFIED.move_to_end(key)
        return None
    if key[2] != size:
        return f"size is {key[2]} bytes, {MANIFEST} says {size} (truncated?)"
    started = time.time_ns()
    try:
        digest = _sha256_file(path)
    except OSError as exc:
        return f"cannot be read ({exc})"
    if digest != sha256:
        return f"sha256 mismatch (manifest {sha256[:12]}..., file {digest[:12]}...), the file is corrupted"
    with contextlib.suppress(OSError):
        if started - key[3] > RACY_WINDOW_NS and _file_key(path, sha256) == key:
            _VERIFIED[key] = None
            while len(_VERIFIED) > VERIFIED_CACHE_SIZE:
                _VERIFIED.popitem(last=False)
    return None


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


# --------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------


class EpisodeBuffer:
    """Accumulates one episode in memory until it is written.

    Every :meth:`append` must provide one frame per camera (``uint8`` RGB,
    identical ``(H, W, 3)`` shape for all steps) and exactly the scalar series
    of :data:`SCALAR_FIELDS` as keyword arguments.  Frames are copied, so a
    renderer may reuse its output buffer.
    """

    def __init__(self, cameras: Sequence[str]):
        cameras = list(cameras)
        if not cameras or len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras must be a non-empty list of unique names, got {cameras!r}")
        self.cameras: tuple[str, ...] = tuple(cameras)
        self._frames: dict[str, list[np.ndarray]] = {cam: [] for cam in self.cameras}
        self._scalars: dict[str, list[Any]] = {name: [] for name in SCALAR_FIELDS}
        self._shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self._scalars["steering"])

    @property
    def resolution(self) -> tuple[int, int] | None:
        """``(H, W)`` of the frames appended so far (``None`` while empty)."""
        return None if self._shape is None else (self._shape[0], self._shape[1])

    def append(self, frames: Mapping[str, np.ndarray], **scalars: Any) -> None:
        """Add one step.  Raises ValueError naming the offending camera/field."""
        step = len(self)
        if set(frames) != set(self.cameras):
            raise ValueError(
                f"step {step}: frames given for cameras {sorted(frames)}, "
                f"but the episode records {sorted(self.cameras)}; pass exactly one frame per camera"
            )
        missing = sorted(set(SCALAR_FIELDS) - set(scalars))
        unknown = sorted(set(scalars) - set(SCALAR_FIELDS))
        if missing or unknown:
            raise ValueError(
                f"step {step}: scalar fields must be exactly those of sim.log.SCALAR_FIELDS; "
                f"missing {missing}, unknown {unknown}"
            )
        for name, value in scalars.items():
            if np.ndim(value) != 0:
                raise ValueError(f"step {step}: {name} must be a scalar, got shape {np.shape(value)}")
            kind = np.asarray(value).dtype.kind
            if kind not in "iuf":  # bool, str, object, complex: almost certainly a caller bug
                raise ValueError(f"step {step}: {name} must be a real number, got {value!r}")
        checked = {}
        for cam in self.cameras:
            frame = np.asarray(frames[cam])
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(
                    f"step {step}: frame of camera {cam!r} has dtype {frame.dtype} and shape "
                    f"{frame.shape}; expected uint8 RGB of shape (H, W, 3)"
                )
            if self._shape is None:
                self._shape = frame.shape
            elif frame.shape != self._shape:
                raise ValueError(
                    f"step {step}: frame of camera {cam!r} has shape {frame.shape}, but earlier "
                    f"frames are {self._shape}; all cameras must render at one resolution"
                )
            checked[cam] = frame.copy()
        for cam, frame in checked.items():
            self._frames[cam].append(frame)
        for name, value in scalars.items():
            self._scalars[name].append(value.item() if isinstance(value, np.generic | np.ndarray) else value)

    def clear(self) -> None:
        """Drop all steps (the cameras stay)."""
        for frames in self._frames.values():
            frames.clear()
        for values in self._scalars.values():
            values.clear()
        self._shape = None

    def arrays(self) -> dict[str, np.ndarray]:
        """Stacked arrays with the schema dtypes: scalar names and ``frames/<cam>``."""
        out: dict[str, np.ndarray] = {}
        for name, spec in SCALAR_FIELDS.items():
            values = self._scalars[name]
            if spec.allowed is not None:  # integer codes: refuse silent wrap-around
                raw = np.asarray(values, dtype=np.float64)
                if raw.size and (not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw))
                                 or raw.min() < -128 or raw.max() > 127):
                    raise ValueError(
                        f"{name} must hold integer codes {spec.range_text()}, got {sorted(set(values))}"
                    )
            out[name] = np.asarray(values, dtype=spec.dtype).reshape(len(values))
        for cam in self.cameras:
            if self._frames[cam]:
                out[f"frames/{cam}"] = np.stack(self._frames[cam])
            else:
                out[f"frames/{cam}"] = np.zeros((0, 0, 0, 3), dtype=np.uint8)
        return out


class DrivingLogWriter:
    """Writes episodes into a driving-log directory, resuming an existing one.

    Parameters
    ----------
    path:
        Dataset directory; created if needed.
    config:
        The recording command's configuration (tracks, seeds, noise,
        cameras, ...).  Reopening a directory whose manifest holds a different
        config raises :class:`LogError` unless ``overwrite_mismatch`` is set.
    cameras, resolution:
        Camera names and frame ``(H, W)``; every episode must match.
    suite, seeds, extra:
        Stored in the manifest (``extra`` under ``"extra"``).
    overwrite_mismatch:
        If the directory holds a *different* recording, discard it: its
        listed and orphaned episode files and its manifest are deleted and a
        new recording starts.  Other files are never touched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        config: dict,
        cameras: Sequence[str],
        resolution: tuple[int, int],
        suite: str | None = None,
        seeds: dict | list | None = None,
        extra: dict | None = None,
        overwrite_mismatch: bool = False,
    ):
        self.path = os.fspath(path)
        self.cameras = tuple(cameras)
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be a non-empty list of unique names, got {list(cameras)!r}")
        for cam in self.cameras:
            if not isinstance(cam, str) or not _CAMERA_RE.match(cam):
                raise ValueError(f"camera name {cam!r} must match {_CAMERA_RE.pattern}")
        if len(resolution) != 2 or any(int(v) <= 0 for v in resolution):
            raise ValueError(f"resolution must be (H, W) with positive sizes, got {resolution!r}")
        self.resolution = (int(resolution[0]), int(resolution[1]))
        header = {
            "schema_version": SCHEMA_VERSION,
            "config": _json_normalise(config, "config"),
            "cameras": list(self.cameras),
            "resolution": list(self.resolution),
            "suite": suite,
            "seeds": _json_normalise(seeds, "seeds"),
            "extra": _json_normalise(extra if extra is not None else {}, "extra"),
            "frame_storage": {
                "chunks": [1, self.resolution[0], self.resolution[1], 3],
                "compression": FRAME_COMPRESSION,
                "compression_opts": FRAME_COMPRESSION_LEVEL,
                "shuffle": False,
            },
        }
        os.makedirs(self.path, exist_ok=True)
        with _dir_lock(self.path):
            manifest_path = os.path.join(self.path, MANIFEST)
            manifest = None
            if os.path.exists(manifest_path):
                manifest = _read_manifest(self.path)
                if not self._same_recording(manifest, header):
                    if not overwrite_mismatch:
                        raise LogError(self._mismatch_message(manifest, header))
                    self._discard(manifest)
                    manifest = None
            else:
                self._refuse_foreign_directory()
            self._remove_stale_tmp()
            if manifest is None:  # a new recording: the manifest exists before any episode
                manifest = dict(header)
                manifest.update(
                    created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    software=software_versions(),
                    episodes={},
                    bytes_per_frame=None,
                )
                self._store_manifest(manifest)
            else:  # resuming: the manifest (creation time, software) is left as it is
                self._manifest = manifest

    # ---- opening -----------------------------------------------------------

    @staticmethod
    def _same_recording(manifest: dict, header: dict) -> bool:
        return all(manifest.get(key) == header[key] for key in ("config", "cameras", "resolution"))

    def _mismatch_message(self, manifest: dict, header: dict) -> str:
        differing = []
        for key in ("cameras", "resolution"):
            if manifest.get(key) != header[key]:
                differing.append(f"{key}: recorded {manifest.get(key)!r}, requested {header[key]!r}")
        old, new = manifest.get("config"), header["config"]
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key, "<absent>") != new.get(key, "<absent>"):
                    differing.append(
                        f"config[{key!r}]: recorded {old.get(key, '<absent>')!r}, "
                        f"requested {new.get(key, '<absent>')!r}"
                    )
        elif old != new:
            differing.append(f"config: recorded {old!r}, requested {new!r}")
        shown = "; ".join(differing[:8]) + ("; ..." if len(differing) > 8 else "")
        return (
            f"{self.path} already holds a different recording "
            f"({len(manifest.get('episodes', {}))} episodes; {shown}). Nothing was changed: "
            "pick another --out directory, or rerun with the original configuration to resume it"
        )

    def _refuse_foreign_directory(self) -> None:
        foreign = sorted(n for n in os.listdir(self.path) if not n.endswith(TMP_SUFFIX))
        if foreign:
            listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise LogError(
                f"{self.path} is not empty ({listed}) but has no {MANIFEST}, so it is not a "
                "driving log this writer can resume; pick another --out directory (nothing was changed)"
            )

    def _discard(self, manifest: dict) -> None:
        """Delete a previous recording's episode files and manifest (overwrite_mismatch)."""
        names = {e.get("file") for e in manifest["episodes"].values() if isinstance(e, dict)}
        names |= {n for n in os.listdir(self.path) if _EPISODE_RE.match(n)}
        for name in sorted(n for n in names if isinstance(n, str) and _EPISODE_RE.match(n)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.path, name))
        os.remove(os.path.join(self.path, MANIFEST))
        fsync_dir(self.path)

    def _remove_stale_tmp(self) -> None:
        """Remove ``*.tmp`` files no live writer holds (caller holds the dir lock)."""
        for name in sorted(os.listdir(self.path)):
            if not name.endswith(TMP_SUFFIX):
                continue
            tmp = os.path.join(self.path, name)
            try:
                fd = os.open(tmp, os.O_RDONLY)
            except OSError:
                continue
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # another process is writing this episode right now
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                        os.remove(tmp)
            finally:
                os.close(fd)

    # ---- manifest ----------------------------------------------------------

    def _store_manifest(self, manifest: dict) -> None:
        text = json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n"
        atomic_write(os.path.join(self.path, MANIFEST), text.encode("utf-8"))
        self._manifest = manifest

    @property
    def manifest(self) -> dict:
        """The manifest as last written by this writer."""
        return self._manifest

    def _listed(self) -> dict[int, dict]:
        """The manifest's well-formed episode entries by index (malformed ones are re-recorded)."""
        listed = {}
        for key, entry in _read_manifest(self.path)["episodes"].items():
            try:
                listed[int(key)] = {"file": str(entry["file"]), "bytes": int(entry["bytes"]),
                                    "sha256": str(entry["sha256"])}
            except (KeyError, TypeError, ValueError):
                continue
        return listed

    def _problem(self, entry: dict) -> str | None:
        return _file_problem(os.path.join(self.path, entry["file"]), entry["bytes"], entry["sha256"])

    def damaged(self) -> dict[int, str]:
        """Listed episodes whose file is missing or differs from the manifest (size, sha256),
        with the problem; resuming re-records them (the content is deterministic)."""
        problems = {index: self._problem(entry) for index, entry in self._listed().items()}
        return {index: problem for index, problem in sorted(problems.items()) if problem is not None}

    def completed(self) -> set[int]:
        """Indices of complete episodes: listed in the manifest, present on disk, with the
        size and sha256 the manifest records (an unchanged file is hashed once per process)."""
        return {index for index, entry in self._listed().items() if self._problem(entry) is None}

    # ---- writing -----------------------------------------------------------

    def write_episode(self, index: int, buffer: EpisodeBuffer, attrs: dict) -> dict:
        """Write episode ``index`` durably and register it in the manifest.

        ``attrs`` must contain ``track`` (name, or spec dict), ``seed`` and
        ``condition`` and may hold any further JSON-serialisable metadata.
        Returns the manifest entry ``{"file", "length", "sha256", "bytes",
        "frame_bytes", "attrs"}``.
        """
        if isinstance(index, bool) or not isinstance(index, int | np.integer) or index < 0:
            raise ValueError(f"episode index must be a non-negative int, got {index!r}")
        index = int(index)
        name = episode_file(index)
        where = f"{self.path}/{name}"
        listed = self._listed().get(index)
        if listed is not None and self._problem(listed) is None:
            raise LogError(
                f"{where} is already complete; skip the indices in writer.completed() "
                "(delete the file first to re-record it)"
            )
        attrs = self._check_attrs(attrs, index, where)
        arrays = self._check_buffer(buffer, where)
        image, frame_bytes = self._serialise(index, arrays, attrs)
        sha = hashlib.sha256(image).hexdigest()
        self._commit_file(os.path.join(self.path, name), image)
        entry = {
            "attrs": attrs,
            "bytes": len(image),
            "file": name,
            "frame_bytes": frame_bytes,
            "length": len(buffer),
            "sha256": sha,
        }
        with _dir_lock(self.path):  # re-read: other processes may have added episodes
            manifest = _read_manifest(self.path)
            manifest["episodes"][str(index)] = entry
            frames = sum(e["length"] for e in manifest["episodes"].values()) * len(self.cameras)
            stored = sum(e["frame_bytes"] for e in manifest["episodes"].values())
            manifest["bytes_per_frame"] = round(stored / frames, 1) if frames else None
            self._store_manifest(manifest)
        return entry

    def _check_attrs(self, attrs: dict, index: int, where: str) -> dict:
        if not isinstance(attrs, Mapping):
            raise ValueError(f"{where}: attrs must be a dict, got {type(attrs).__name__}")
        missing = [key for key in _REQUIRED_ATTRS if key not in attrs]
        if missing:
            raise ValueError(f"{where}: attrs is missing {missing}; every episode records {list(_REQUIRED_ATTRS)}")
        if "schema_version" in attrs:
            raise ValueError(f"{where}: attrs['schema_version'] is set by the writer; remove it")
        if "episode" in attrs and attrs["episode"] != index:
            raise ValueError(
                f"{where}: attrs['episode'] is {attrs['episode']!r} but the episode is written as index {index}"
            )
        for key in attrs:
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"{where}: attribute name {key!r} must be a non-empty string without '/'")
        return _json_normalise(dict(attrs), f"{where}: attrs")

    def _check_buffer(self, buffer: EpisodeBuffer, where: str) -> dict[str, np.ndarray]:
        if len(buffer) == 0:
            raise ValueError(f"{where}: the episode buffer is empty; record at least one step")
        if tuple(buffer.cameras) != self.cameras:
            raise ValueError(
                f"{where}: buffer records cameras {list(buffer.cameras)}, the dataset "
                f"{list(self.cameras)}; create the EpisodeBuffer with the writer's cameras"
            )
        if buffer.resolution != self.resolution:
            raise ValueError(
                f"{where}: frames are {buffer.resolution} (H, W) but the dataset was created "
                f"with resolution {self.resolution}"
            )
        arrays = buffer.arrays()
        problems = []
        for name, spec in SCALAR_FIELDS.items():
            problems += _check_series(name, spec, arrays[name], len(buffer))
        if problems:
            raise ValueError(f"{where}: refusing to write invalid data: " + "; ".join(problems))
        return arrays

    def _serialise(self, index: int, arrays: dict[str, np.ndarray], attrs: dict) -> tuple[bytes, int]:
        """Build the episode file image in memory; deterministic for equal content."""
        h, w = self.resolution
        root_attrs = {**attrs, "schema_version": SCHEMA_VERSION, "episode": index}
        # The core driver never touches the file system with backing_store=False.
        with h5py.File(
            f"steerloop-episode-{index}-{os.getpid()}.h5",
            "w",
            driver="core",
            backing_store=False,
            libver=_LIBVER,
            track_order=False,
        ) as fh:
            for key in sorted(root_attrs):
                fh.attrs[key] = _attr_value(root_attrs[key])
            group = fh.create_group("frames", track_order=False)
            frame_bytes = 0
            for cam in sorted(self.cameras):
                ds = group.create_dataset(
                    cam,
                    data=arrays[f"frames/{cam}"],
                    chunks=(1, h, w, 3),
                    compression=FRAME_COMPRESSION,
                    compression_opts=FRAME_COMPRESSION_LEVEL,
                    track_times=False,
                )
                ds.attrs["unit"] = "RGB uint8"
                frame_bytes += int(ds.id.get_storage_size())
            for name in sorted(SCALAR_FIELDS):
                spec = SCALAR_FIELDS[name]
                ds = fh.create_dataset(name, data=arrays[name], track_times=False)
                ds.attrs["description"] = spec.description
                ds.attrs["unit"] = spec.unit
            fh.flush()
            image = fh.id.get_file_image()
        return image, frame_bytes

    def _commit_file(self, final: str, image: bytes) -> None:
        """tmp write (locked against the stale-tmp cleaner) + fsync + rename + dir fsync."""
        tmp = final + TMP_SUFFIX
        while True:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
            if fcntl is None:  # pragma: no cover - Windows
                break
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a cleaner may have unlinked the path between open and lock
                if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            write_all(fd, image)
            os.fsync(fd)
            os.replace(tmp, final)
        finally:
            os.close(fd)
        fsync_dir(self.path)


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


class DrivingLog:
    """Reader for a driving-log directory.

    Episode files are opened lazily, read-only, and their handles cached (at
    most ``max_open`` at a time, least recently used closed first).  The
    object is safe to use in forked DataLoader workers (handles inherited
    across ``fork`` are discarded and reopened) and picklable for spawned ones.

    With ``skip_corrupt=True`` every listed episode is checked at open
    (file present, size and sha256 as in the manifest); bad ones are left out
    of :attr:`episodes` and recorded in :attr:`skipped` as ``(index, reason)``.
    Otherwise a missing file raises :class:`LogError`; with ``verify=True``
    (what training and offline evaluation use) the first episode that fails
    the check raises :class:`CorruptEpisodeError` at open, before any data is
    read; without it corruption surfaces only on read or via :meth:`verify`.
    Checks of unchanged files are cached per process (module docstring,
    *Integrity*).
    """

    def __init__(self, path: str | os.PathLike, skip_corrupt: bool = False, *, verify: bool = False,
                 max_open: int = _DEFAULT_MAX_OPEN):
        self.path = os.fspath(path)
        self.manifest: dict = _read_manifest(self.path)
        self.cameras: list[str] = list(self.manifest["cameras"])
        self.resolution: tuple[int, int] = tuple(self.manifest["resolution"])  # type: ignore[assignment]
        self.skipped: list[tuple[int, str]] = []
        self._max_open = max(1, int(max_open))
        self._entries: dict[int, dict] = {}
        for key, entry in self.manifest["episodes"].items():
            try:
                index = int(key)
                if entry["file"] != episode_file(index):
                    raise ValueError(entry["file"])
                self._entries[index] = {"file": str(entry["file"]), "length": int(entry["length"]),
                                        "sha256": str(entry["sha256"]), "bytes": int(entry["bytes"])}
            except (KeyError, TypeError, ValueError):
                raise LogError(
                    f"{self._manifest_path}: entry episodes[{key!r}] is malformed; "
                    "the manifest is damaged — re-record the dataset"
                ) from None
        episodes = []
        for index in sorted(self._entries):
            if skip_corrupt:
                try:
                    self.verify(index)
                except CorruptEpisodeError as exc:
                    self.skipped.append((index, str(exc)))
                    continue
            elif not os.path.isfile(self._file(index)):
                raise LogError(
                    f"{self._file(index)} is listed in {self._manifest_path} but missing; "
                    "re-run the recorder on this directory to re-record it, or open with skip_corrupt=True"
                )
            elif verify:
                self.verify(index)
            episodes.append(index)
        self.episodes: list[int] = episodes
        self._handles: OrderedDict[int, h5py.File] = OrderedDict()
        self._pid = os.getpid()

    # ---- bookkeeping -------------------------------------------------------

    @property
    def _manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)

    def _file(self, index: int) -> str:
        return os.path.join(self.path, self._entries[index]["file"])

    def _entry(self, index: int) -> dict:
        for skipped, reason in self.skipped:
            if skipped == index:
                raise CorruptEpisodeError(f"episode {index} was skipped when the log was opened: {reason}")
        if index not in self._entries:
            shown = ", ".join(str(i) for i in self.episodes[:10]) + (", ..." if len(self.episodes) > 10 else "")
            raise IndexError(f"episode {index} is not in {self._manifest_path} (episodes: {shown})")
        return self._entries[index]

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def total_steps(self) -> int:
        """Number of steps over all usable episodes."""
        return sum(self._entries[i]["length"] for i in self.episodes)

    def episode_length(self, index: int) -> int:
        """Number of steps of episode ``index`` (from the manifest; no file access)."""
        return self._entry(index)["length"]

    def episode_attrs(self, index: int) -> dict:
        """Recorder metadata of episode ``index`` (track, seed, condition, ...)."""
        self._entry(index)
        return dict(self.manifest["episodes"][str(index)]["attrs"])

    def close(self) -> None:
        """Close all cached file handles (the object stays usable)."""
        if os.getpid() == self._pid:
            for handle in self._handles.values():
                with contextlib.suppress(Exception):
                    handle.close()
        self._handles = OrderedDict()
        self._pid = os.getpid()

    def __enter__(self) -> DrivingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _handle(self, index: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked: inherited handles belong to the parent
            self._handles = OrderedDict()
            self._pid = os.getpid()
        entry = self._entry(index)
        handle = self._handles.get(index)
        if handle is not None:
            self._handles.move_to_end(index)
            return handle
        path = self._file(index)
        try:
            handle = h5py.File(path, "r", swmr=False)
        except (OSError, ValueError) as exc:
            raise CorruptEpisodeError(
                f"{path}: cannot open as HDF5 ({exc}); the file is truncated or corrupted — "
                "delete it and re-run the recorder on this directory to re-record it"
            ) from None
        try:
            stored = handle["steering"].shape[0]
        except (KeyError, OSError) as exc:
            handle.close()
            raise CorruptEpisodeError(f"{path}: unreadable 'steering' dataset ({exc}); re-record it") from None
        if stored != entry["length"]:
            handle.close()
            raise CorruptEpisodeError(
                f"{path}: holds {stored} steps but {MANIFEST} says {entry['length']}; "
                "the file does not belong to this manifest — delete it and re-record it"
            )
        self._handles[index] = handle
        while len(self._handles) > self._max_open:
            _, old = self._handles.popitem(last=False)
            old.close()
        return handle

    def _cameras(self, cameras: Sequence[str] | None) -> list[str]:
        if cameras is None:
            return list(self.cameras)
        if isinstance(cameras, str):
            cameras = [cameras]
        unknown = [cam for cam in cameras if cam not in self.cameras]
        if unknown:
            raise KeyError(f"cameras {unknown} are not recorded in {self.path}; available: {self.cameras}")
        return list(cameras)

    def _read(self, index: int, selection: slice, cameras: Sequence[str] | None) -> dict[str, np.ndarray]:
        cams = self._cameras(cameras)
        handle = self._handle(index)
        name = "<none>"
        try:
            out = {}
            for name in SCALAR_FIELDS:
                out[name] = handle[name][selection]
            for cam in cams:
                name = f"frames/{cam}"
                out[name] = handle[name][selection]
        except (OSError, KeyError, ValueError) as exc:
            raise CorruptEpisodeError(
                f"{self._file(index)}: cannot read {name} ({exc}); the file is corrupted — "
                "run validate() on the dataset, delete the file and re-record it"
            ) from None
        return out

    # ---- public reads ------------------------------------------------------

    def read_episode(self, index: int, cameras: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All steps of episode ``index``: scalar series and ``frames/<cam>`` arrays."""
        return self._read(index, slice(None), cameras)

    def read_window(
        self, index: int, start: int, T: int, cameras: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Steps ``[start, start + T)`` of episode ``index`` (same keys as read_episode)."""
        length = self.episode_length(index)
        if T < 1 or start < 0 or start + T > length:
            raise IndexError(
                f"window start={start}, T={T} is out of range for {self._entries[index]['file']} "
                f"with {length} steps (need T >= 1 and 0 <= start <= {length - T})"
            )
        return self._read(index, slice(int(start), int(start) + int(T)), cameras)

    def verify(self, index: int) -> None:
        """Check size and sha256 of episode ``index`` (cached while the file is unchanged);
        CorruptEpisodeError naming the file otherwise."""
        entry = self._entry(index)
        path = self._file(index)
        problem = _file_problem(path, entry["bytes"], entry["sha256"])
        if problem is not None:
            raise CorruptEpisodeError(
                f"{path}: {problem}; re-record it (re-run the command that recorded {self.path}: it records "
                f"damaged episodes again) or run `steerloop validate {self.path}` to list every problem"
            )


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def validate(path: str | os.PathLike, notes: list[str] | None = None) -> list[str]:
    """Check a driving log completely; return one line per problem ([] if valid).

    Leftovers of an interrupted recording (``*.tmp`` files, or a finished
    episode file the manifest does not list yet) are not problems: they are
    appended to ``notes`` when a list is given.  Never raises for damaged
    data; each problem line names the file concerned.
    """
    path = os.fspath(path)
    try:
        manifest = _read_manifest(path)
    except LogError as exc:
        return [str(exc)]
    problems: list[str] = []
    notes = notes if notes is not None else []
    cameras = manifest["cameras"]
    resolution = manifest["resolution"]
    if len(resolution) != 2 or not all(isinstance(v, int) and v > 0 for v in resolution):
        problems.append(f"{MANIFEST}: resolution {resolution!r} is not [H, W] with positive ints")
        resolution = None
    listed = set()
    for key in sorted(manifest["episodes"], key=lambda k: (len(k), k)):
        entry = manifest["episodes"][key]
        try:
            if not isinstance(entry, dict) or not {"file", "length", "sha256", "bytes"} <= set(entry):
                raise KeyError(key)
            index = int(key)
            name = str(entry["file"])
            length = int(entry["length"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{MANIFEST}: entry episodes[{key!r}] is malformed (needs file, length, sha256, bytes)")
            continue
        listed.add(name)
        if name != episode_file(index):
            problems.append(f"{MANIFEST}: episode {index} points to {name!r}, expected {episode_file(index)!r}")
            continue
        problems += [f"{name}: {p}" for p in _validate_episode(path, index, entry, length, cameras, resolution)]
    for name in sorted(os.listdir(path)):
        if name == MANIFEST or name in listed:
            continue
        if name == MANIFEST + TMP_SUFFIX:
            notes.append(f"{name}: interrupted manifest update, {MANIFEST} is intact and the update will be redone")
        elif name.endswith(TMP_SUFFIX):
            notes.append(f"{name}: incomplete episode in flight, will be re-recorded")
        elif _is_unregistered_episode(path, name):
            notes.append(f"{name}: written but not registered in {MANIFEST} (interrupted), will be re-recorded")
        else:
            problems.append(
                f"{name}: not listed in the manifest (left over from another recording?); move it elsewhere"
            )
    return problems


def _validate_episode(
    root: str, index: int, entry: dict, length: int, cameras: Sequence[str], resolution: Sequence[int] | None
) -> list[str]:
    """Problems of one listed episode file (without the file-name prefix)."""
    path = os.path.join(root, entry["file"])
    fix = "delete it and re-run the recorder on this directory to re-record it"
    if not os.path.isfile(path):
        return [f"listed in {MANIFEST} but missing; re-run the recorder on this directory to re-record it"]
    # A checksum failure is reported alone: the contents of a damaged file are meaningless.
    try:
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            return [f"size is {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or damaged); {fix}"]
        if _sha256_file(path) != entry["sha256"]:
            return [f"sha256 does not match {MANIFEST} (corrupted); {fix}"]
    except OSError as exc:
        return [f"cannot be read ({exc}); check its permissions"]
    try:
        handle = h5py.File(path, "r")
    except Exception as exc:  # noqa: BLE001 - any failure means an unreadable file
        return [f"cannot be opened as HDF5 ({type(exc).__name__}: {exc}); {fix}"]
    try:
        with handle:
            return _validate_contents(handle, index, length, cameras, resolution)
    except Exception as exc:  # noqa: BLE001 - damaged internals may fail anywhere
        return [f"unreadable content ({type(exc).__name__}: {exc}); {fix}"]


def _is_unregistered_episode(path: str, name: str) -> bool:
    """True if ``name`` is a complete episode file whose manifest update was interrupted.

    Such a file opens as HDF5 and its ``episode`` attribute matches its file name;
    anything else (e.g. a copy of another episode) is a stray file.
    """
    match = _EPISODE_RE.match(name)
    if match is None:
        return False
    try:
        with h5py.File(os.path.join(path, name), "r") as fh:
            return int(fh.attrs["episode"]) == int(match[1])
    except Exception:  # noqa: BLE001 - unreadable means not a finished episode
        return False


def _validate_contents(
    fh: h5py.File, index: int, length: int, cameras: Sequence[str], resolution: Sequence[int] | None
) -> list[str]:
    problems = []
    for key in (*_RESERVED_ATTRS, *_REQUIRED_ATTRS):
        if key not in fh.attrs:
            problems.append(f"root attribute {key!r} is missing")
    if "schema_version" in fh.attrs:
        try:
            _check_version(str(fh.attrs["schema_version"]), "file")
        except LogError as exc:
            problems.append(str(exc).removeprefix("file: "))
    if "episode" in fh.attrs and int(fh.attrs["episode"]) != index:
        problems.append(f"root attribute episode is {int(fh.attrs['episode'])}, manifest lists it as {index}")
    for name, spec in SCALAR_FIELDS.items():
        if name not in fh or not isinstance(fh[name], h5py.Dataset):
            problems.append(f"dataset {name} is missing")
            continue
        try:
            data = fh[name][()]
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name} cannot be read ({type(exc).__name__}: {exc})")
            continue
        problems += _check_series(name, spec, np.asarray(data), length)
    for cam in cameras:
        key = f"frames/{cam}"
        if key not in fh or not isinstance(fh[key], h5py.Dataset):
            problems.append(f"dataset {key} is missing")
        elif resolution is not None:
            ds = fh[key]
            problems += _check_frame_shape(cam, ds.dtype, ds.shape, length, resolution)
    known = set(SCALAR_FIELDS) | {"frames"}
    for name in sorted(set(fh) - known):
        problems.append(f"unexpected object {name!r} (not in schema {SCHEMA_VERSION})")
    if "frames" in fh:
        for cam in sorted(set(fh["frames"]) - set(cameras)):
            problems.append(f"unexpected camera frames/{cam} (manifest cameras: {list(cameras)})")
    return problems
