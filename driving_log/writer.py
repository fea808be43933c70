"""Recording: an episode accumulates in an :class:`EpisodeBuffer` and :class:`DrivingLogWriter`
commits it crash-safely (temporary file, fsync, rename, then the manifest)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from steerloop.driving_log.schema import (
    FRAME_COMPRESSION, FRAME_COMPRESSION_LEVEL, LogError, MANIFEST, SCALAR_FIELDS, SCHEMA_VERSION, _CAMERA_RE,
    _EPISODE_RE, _LIBVER, _REQUIRED_ATTRS, _attr_value, _check_series, _json_normalise, _read_manifest,
    episode_file,
)
from steerloop.driving_log.integrity import _dir_lock, _file_problem, fcntl
from steerloop.files import TMP_SUFFIX, atomic_write, fsync_dir, software_versions, write_all


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
                f"step {step}: scalar fields must be exactly those of steerloop.driving_log.SCALAR_FIELDS; "
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
