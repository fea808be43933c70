"""``steerloop validate``: every problem of a driving-log directory, one line each."""

from __future__ import annotations

import os
from collections.abc import Sequence

import h5py
import numpy as np

from steerloop.driving_log.schema import (
    LogError, MANIFEST, SCALAR_FIELDS, SCHEMA_VERSION, _EPISODE_RE, _REQUIRED_ATTRS, _RESERVED_ATTRS,
    _check_frame_shape, _check_series, _check_version, _read_manifest, episode_file,
)
from steerloop.driving_log.integrity import _sha256_file
from steerloop.files import TMP_SUFFIX


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
