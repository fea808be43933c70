"""Checksums and locks: sha256 of episode files with an in-process verification cache, and the
advisory directory lock that serialises writers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator

from steerloop.driving_log.schema import MANIFEST


try:  # advisory locks; unavailable on Windows, where a directory has one writer.
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]

VERIFIED_CACHE_SIZE = 16384  # entries (~0.2 KB each) of the in-process checksum-verification cache
RACY_WINDOW_NS = 2_000_000_000  # [ns] files modified this recently are re-hashed at every use (FAT: 2 s mtime ticks)
_VERIFIED: OrderedDict[tuple, None] = OrderedDict()  # stat identity + expected sha256 of files that matched


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
