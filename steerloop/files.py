"""Writing files so that a crash never leaves a half-written one, and recording what wrote them.

:func:`atomic_write` is the one place steerloop writes a file in place: the bytes go to a
temporary file beside the target, are fsynced, renamed over the target (atomic on POSIX)
and the directory is fsynced, so a reader (or a resumed run) sees the old file or the new
one, never a mixture. :func:`software_versions` is what every manifest and results file
records about the software that produced it.
"""

from __future__ import annotations

import json
import math
import os
import platform
from importlib import metadata
from typing import Any

TMP_SUFFIX = ".tmp"  # atomic_write's temporary file is TARGET + TMP_SUFFIX
RECORDED_PACKAGES = ("steerloop", "numpy", "h5py", "torch", "gymnasium", "pybullet", "stable-baselines3")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str | os.PathLike, data: bytes | str, *, shared: bool = False) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) via a fsynced temporary file and
    a rename: after a crash the file holds either its old or its new content. ``shared``: other
    processes may write the same file at once (the temporary name then carries the pid)."""
    path = os.fspath(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}" if shared else path + TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return json_safe(value.item())
    return value


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 1) -> None:
    """:func:`atomic_write` of ``value`` as strict JSON (sorted keys; NaN written as null)."""
    atomic_write(path, json.dumps(json_safe(value), indent=indent, sort_keys=True, allow_nan=False) + "\n")


def software_versions() -> dict[str, str]:
    """Python's and the recorded packages' versions ("not installed" where absent), read from
    package metadata without importing anything."""
    versions = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        import h5py

        versions["hdf5"] = h5py.version.hdf5_version
    except ImportError:
        pass
    return versions
