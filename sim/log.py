"""Driving logs: a durable dataset format for recorded driving sequences.

A dataset is a directory holding one HDF5 file per episode plus ``manifest.json``:

    DIR/manifest.json
    DIR/episode_000000.h5
    DIR/episode_000001.h5 ...

Each episode file (readable with plain h5py) holds, for N steps:

- ``frames/<camera>``: uint8 (N, H, W, 3) RGB, gzip-compressed losslessly in chunks of
  one frame, so a window of T steps is read without decoding the whole episode;
- one 1-D dataset of length N per entry of :data:`SERIES` (dtype, unit, valid range);
- root attributes: ``schema_version``, ``episode``, ``attrs`` (JSON of the recorder's
  metadata: track, seed, condition, ...).

Durability: an episode is written to ``episode_XXXXXX.h5.tmp``, flushed, fsynced and
renamed only when complete; the manifest is rewritten atomically (tmp + fsync + rename)
after every episode. Killing the writer at any moment leaves every completed episode
intact and the manifest consistent; stale ``.tmp`` files are ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

SCHEMA_VERSION = "1.0.0"
MANIFEST = "manifest.json"
FRAME_COMPRESSION = {"compression": "gzip", "compression_opts": 1}  # lossless; ~3x on road frames
STEERING_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class Series:
    dtype: str
    unit: str
    low: float = -np.inf
    high: float = np.inf


# The per-step scalar series of an episode: name -> dtype, unit, valid range (inclusive).
SERIES = {
    "steering": Series("float32", "normalised command, executed", *STEERING_RANGE),
    "expert_steering": Series("float32", "normalised command, clean expert label", *STEERING_RANGE),
    "speed": Series("float32", "m/s", 0.0 - 1.0, 60.0),
    "throttle": Series("float32", "normalised throttle", -1.0, 1.0),
    "x": Series("float64", "m"),
    "y": Series("float64", "m"),
    "yaw": Series("float64", "rad"),
    "lateral_offset": Series("float32", "m, + = left"),
    "heading_error": Series("float32", "rad", -np.pi, np.pi),
    "progress": Series("float64", "m", 0.0),
    "curvature": Series("float32", "1/m"),
    "time": Series("float64", "s", 0.0),
    "wheel_angle": Series("float32", "rad", -1.6, 1.6),
    "perturbation_phase": Series("int8", "0 none, 1 acting, 2 recovery window", 0, 2),
}


class LogError(Exception):
    """A dataset cannot be written or read; the message names the directory or file."""


class CorruptEpisodeError(LogError):
    """An episode file is truncated, corrupted or fails its checksum."""


def _major(version: str) -> int:
    return int(str(version).split(".")[0])


def episode_file(index: int) -> str:
    return f"episode_{index:06d}.h5"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def software_versions() -> dict:
    versions = {"python": platform.python_version(), "numpy": np.__version__, "h5py": h5py.__version__}
    try:
        versions["steerloop"] = metadata.version("steerloop")
    except metadata.PackageNotFoundError:
        versions["steerloop"] = "unknown"
    return versions


class EpisodeBuffer:
    """One episode accumulated in memory, step by step."""

    def __init__(self, cameras: Sequence[str]):
        self.cameras = tuple(cameras)
        self.frames: dict[str, list[np.ndarray]] = {c: [] for c in self.cameras}
        self.series: dict[str, list] = {name: [] for name in SERIES}

    def append(self, frames: dict[str, np.ndarray], **scalars) -> None:
        missing = [c for c in self.cameras if c not in frames]
        if missing:
            raise KeyError(f"step is missing frames of cameras {missing}")
        unknown = sorted(set(scalars) - set(SERIES))
        absent = sorted(set(SERIES) - set(scalars))
        if unknown or absent:
            raise KeyError(f"step series mismatch: unknown {unknown}, missing {absent}; see sim.log.SERIES")
        for c in self.cameras:
            self.frames[c].append(frames[c])
        for name, value in scalars.items():
            self.series[name].append(value)

    def __len__(self) -> int:
        return len(self.series["steering"])

    def arrays(self) -> dict[str, np.ndarray]:
        out = {name: np.asarray(values, dtype=SERIES[name].dtype) for name, values in self.series.items()}
        for c in self.cameras:
            out[f"frames/{c}"] = np.stack(self.frames[c]).astype(np.uint8)
        return out


def _write_episode_file(path: Path, index: int, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Byte-reproducible HDF5: no timestamps, fixed creation order and fixed chunking."""
    with h5py.File(path, "w", libver=("earliest", "v110"), track_order=False) as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["episode"] = index
        f.attrs["attrs"] = json.dumps(attrs, sort_keys=True)
        for name in sorted(arrays):
            data = arrays[name]
            if name.startswith("frames/"):
                f.create_dataset(name, data=data, chunks=(1, *data.shape[1:]), track_times=False,
                                 **FRAME_COMPRESSION)
            else:
                f.create_dataset(name, data=data, track_times=False)
        f.flush()


class DrivingLogWriter:
    """Writes episodes into a dataset directory; resumes a directory holding the same recording."""

    def __init__(self, path, *, config: dict, cameras: Sequence[str], resolution: tuple[int, int],
                 suite: str | None = None, seeds=None, extra: dict | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        manifest_path = self.path / MANIFEST
        config = json.loads(json.dumps(config, sort_keys=True))
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except json.JSONDecodeError as error:
                raise LogError(f"{manifest_path}: unreadable manifest ({error}); move the directory aside") from None
            if manifest.get("config") != config:
                raise LogError(f"{self.path} already holds a different recording (its manifest's config differs); "
                               "choose another --out (nothing was changed)")
            self.manifest = manifest
        else:
            self.manifest = {
                "schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(),
                "software": software_versions(), "config": config, "cameras": list(cameras),
                "resolution": [int(v) for v in resolution], "suite": suite, "seeds": seeds,
                "extra": extra or {}, "series": {k: {"dtype": v.dtype, "unit": v.unit} for k, v in SERIES.items()},
                "episodes": {}, "bytes_per_frame": None,
            }
            self._write_manifest()
        for stale in self.path.glob("*.h5.tmp"):
            stale.unlink()

    def completed(self) -> set[int]:
        return {int(k) for k, e in self.manifest["episodes"].items() if (self.path / e["file"]).exists()}

    def _write_manifest(self) -> None:
        _atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=1, sort_keys=True))

    def write_episode(self, index: int, buffer: EpisodeBuffer, attrs: dict) -> dict:
        if len(buffer) == 0:
            raise LogError(f"{self.path}: episode {index} has no steps")
        arrays = buffer.arrays()
        name = episode_file(index)
        tmp = self.path / f"{name}.tmp"
        _write_episode_file(tmp, index, arrays, json.loads(json.dumps(attrs, sort_keys=True)))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        frame_bytes = sum(arrays[f"frames/{c}"].size for c in buffer.cameras)
        size = (self.path / name).stat().st_size
        entry = {"file": name, "length": len(buffer), "sha256": _sha256(self.path / name), "bytes": size,
                 "attrs": json.loads(json.dumps(attrs, sort_keys=True))}
        self.manifest["episodes"][str(index)] = entry
        n_frames = sum(e["length"] for e in self.manifest["episodes"].values()) * len(buffer.cameras)
        total = sum(e["bytes"] for e in self.manifest["episodes"].values())
        self.manifest["bytes_per_frame"] = round(total / max(n_frames, 1), 1)
        self.manifest["raw_bytes_per_frame"] = frame_bytes // max(len(buffer) * len(buffer.cameras), 1)
        self._write_manifest()
        return entry


class DrivingLog:
    """Reads a dataset: episodes, windows, the manifest. ``skip_corrupt`` skips (and counts)
    episodes whose files are missing or fail their checksum instead of raising."""

    def __init__(self, path, skip_corrupt: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise LogError(f"{self.path} is not a driving log: {MANIFEST} is missing (record one with steerloop record)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise LogError(f"{manifest_path}: not valid JSON ({error})") from None
        version = self.manifest.get("schema_version", "0")
        if _major(version) > _major(SCHEMA_VERSION):
            raise LogError(f"{self.path}: schema version {version} is newer than this steerloop supports "
                           f"({SCHEMA_VERSION}, major {_major(SCHEMA_VERSION)}); upgrade steerloop")
        self.skipped: list[tuple[int, str]] = []
        self.episodes: list[int] = []
        for key in sorted(self.manifest.get("episodes", {}), key=int):
            index = int(key)
            if skip_corrupt:
                try:
                    self.verify(index)
                except CorruptEpisodeError as error:
                    self.skipped.append((index, str(error)))
                    continue
            self.episodes.append(index)
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.episodes)

    def _entry(self, index: int) -> dict:
        try:
            return self.manifest["episodes"][str(index)]
        except KeyError:
            raise IndexError(f"{self.path}: no episode {index}; episodes are {self.episodes}") from None

    def episode_length(self, index: int) -> int:
        return int(self._entry(index)["length"])

    def _file(self, index: int) -> h5py.File:
        if os.getpid() != self._pid:  # forked (e.g. a DataLoader worker): never share HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if index not in self._handles:
            path = self.path / self._entry(index)["file"]
            try:
                self._handles[index] = h5py.File(path, "r")
            except (OSError, FileNotFoundError) as error:
                raise CorruptEpisodeError(f"{path}: cannot open episode {index} ({error}); "
                                          "run `steerloop validate` or read with skip_corrupt=True") from None
        return self._handles[index]

    def verify(self, index: int) -> None:
        entry = self._entry(index)
        path = self.path / entry["file"]
        if not path.exists():
            raise CorruptEpisodeError(f"{path}: episode {index} is listed in the manifest but missing")
        if _sha256(path) != entry["sha256"]:
            raise CorruptEpisodeError(f"{path}: episode {index} fails its sha256 checksum (corrupted)")

    def _read(self, index: int, sl: slice, cameras) -> dict[str, np.ndarray]:
        f = self._file(index)
        cameras = self.manifest["cameras"] if cameras is None else cameras
        try:
            out = {name: f[name][sl] for name in SERIES}
            for c in cameras:
                out[f"frames/{c}"] = f[f"frames/{c}"][sl]
        except (OSError, KeyError) as error:
            raise CorruptEpisodeError(f"{self.path / self._entry(index)['file']}: episode {index} is unreadable "
                                      f"({error})") from None
        return out

    def read_episode(self, index: int, cameras=None) -> dict[str, np.ndarray]:
        return self._read(index, slice(None), cameras)

    def read_window(self, index: int, start: int, T: int, cameras=None) -> dict[str, np.ndarray]:
        n = self.episode_length(index)
        if start < 0 or T < 1 or start + T > n:
            raise IndexError(f"window start={start}, T={T} is outside episode {index} of length {n}")
        return self._read(index, slice(start, start + T), cameras)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles = {}


def validate(path) -> list[str]:
    """Every problem of a dataset, one line each (empty when valid)."""
    path = Path(path)
    try:
        log = DrivingLog(path)
    except LogError as error:
        return [str(error)]
    problems = []
    manifest = log.manifest
    height, width = manifest.get("resolution", [None, None])
    listed = set()
    for index in log.episodes:
        entry = manifest["episodes"][str(index)]
        name = entry["file"]
        listed.add(name)
        where = f"{name} (episode {index})"
        try:
            log.verify(index)
        except CorruptEpisodeError as error:
            problems.append(f"{where}: {str(error).split(': ', 1)[-1]}")
            continue
        try:
            with h5py.File(path / name, "r") as f:
                if _major(f.attrs.get("schema_version", "0")) != _major(SCHEMA_VERSION):
                    problems.append(f"{where}: schema version {f.attrs.get('schema_version')} "
                                    f"(supported: {SCHEMA_VERSION})")
                for series, spec in SERIES.items():
                    if series not in f:
                        problems.append(f"{where}: series {series} is missing")
                        continue
                    data = f[series][...]
                    if data.shape != (entry["length"],):
                        problems.append(f"{where}: {series} has shape {data.shape}, expected ({entry['length']},)")
                    if data.dtype != np.dtype(spec.dtype):
                        problems.append(f"{where}: {series} has dtype {data.dtype}, expected {spec.dtype}")
                    bad = ~np.isfinite(data.astype(np.float64))
                    if bad.any():
                        problems.append(f"{where}: {series} has {int(bad.sum())} non-finite values")
                    out = (data < spec.low) | (data > spec.high)
                    if out.any():
                        problems.append(f"{where}: {series} has {int(out.sum())} values outside "
                                        f"[{spec.low}, {spec.high}]")
                for camera in manifest.get("cameras", []):
                    key = f"frames/{camera}"
                    if key not in f:
                        problems.append(f"{where}: frames of camera {camera} are missing")
                        continue
                    ds = f[key]
                    if ds.dtype != np.uint8 or ds.shape != (entry["length"], height, width, 3):
                        problems.append(f"{where}: {key} is {ds.dtype} {ds.shape}, expected uint8 "
                                        f"({entry['length']}, {height}, {width}, 3)")
        except OSError as error:
            problems.append(f"{where}: unreadable HDF5 ({error})")
    for file in sorted(path.glob("episode_*.h5")):
        if file.name not in listed:
            problems.append(f"{file.name}: not listed in the manifest (left over from another recording?)")
    log.close()
    return problems
