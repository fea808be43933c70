"""Names that become file names, and writes that must stay inside their output directory.

Names users choose in files (a suite's ``name``, a track's ``name``, a study's dataset and
policy names) become file and directory names under an output directory, so each is
checked by :func:`safe_name` when its file is parsed, before any work starts: a name like
``"../../x"`` or ``"/tmp/abs"`` is refused with a one-line error naming the field, the
file and the value. Names derived from paths (a checkpoint path naming a cache directory)
go through :func:`slug` instead; the original stays in the JSON written beside them.

Every write site joins its file name with :func:`path_under`, which refuses a result
outside the output directory (``..``, an absolute part, a symlink pointing elsewhere) and
a path component too long for the file system. It lives in ``sim`` so every layer can
use it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MAX_NAME_LENGTH = 128  # [characters] of a checked name
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one path component, never hidden
NAME_MAX_BYTES = 255  # [bytes] of one path component (NAME_MAX on Linux and macOS file systems)
ALLOWED = (f"1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, "
           "without '..'")
SHOWN_CHARS = 80  # [characters] of a refused value quoted in an error message
DIGEST_CHARS = 10  # [hex digits] of the hash that keeps shortened names distinct


class UnsafeNameError(ValueError):
    """A name that becomes a file or directory name is not safe; the message names the
    field, the file it came from and the value, and says which characters are allowed."""


class UnsafePathError(ValueError):
    """A write would land outside its output directory, or a path component is too long."""


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def is_safe_name(value) -> bool:
    """Whether ``value`` is a string :func:`safe_name` accepts."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None and ".." not in value


def safe_name(value, *, field: str, source: str) -> str:
    """``value`` if it is safe as one file or directory name, else :class:`UnsafeNameError`.

    Safe: a string of 1-128 characters from ``A-Za-z0-9._-`` starting with a letter or a
    digit and without ``..``: never empty, ``.``, ``..``, absolute, hidden, or holding a
    separator. ``field`` names the field (e.g. ``"name"``, ``"[datasets.NAME]"``) and
    ``source`` the file it came from; both appear in the message.
    """
    if is_safe_name(value):
        return value
    kind = "" if isinstance(value, str) else f" (type {type(value).__name__}, not a string)"
    raise UnsafeNameError(f"{source}: {field} {_shown(value)}{kind} cannot be used as a file name; "
                          f"use {ALLOWED}")


def shorten(name: str, limit: int = NAME_MAX_BYTES) -> str:
    """``name`` if it fits in ``limit`` bytes, else its start plus a hash of the whole, so
    different long names stay different (for file names composed of several names)."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:DIGEST_CHARS]
    return name.encode()[:limit - DIGEST_CHARS - 1].decode(errors="ignore") + "-" + digest


def slug(value: str, *, limit: int = 60, default: str = "policy") -> str:
    """A safe name (see :func:`safe_name`) made from ``value``, for names derived from paths
    (e.g. a checkpoint path naming a cache directory): the last two path parts joined with
    ``_``, other characters replaced by ``_``, at most ``limit`` characters (the end is
    kept); ``default`` when nothing is left."""
    parts = [p for p in Path(str(value)).parts if p not in ("/", ".", "..")][-2:]
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts))
    text = re.sub(r"\.{2,}", "_", text)[-limit:].lstrip("._-")
    return text if is_safe_name(text) else default


def path_under(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """``root`` joined with ``parts``, refused (:class:`UnsafePathError`) unless it stays
    under ``root`` once every symlink is followed, and every component of ``parts`` fits
    the file system (:data:`NAME_MAX_BYTES`). Returns the joined path as given (not
    resolved), so printed and recorded paths look as the user wrote them."""
    root = Path(root)
    path = root.joinpath(*parts)
    for part in parts:
        for component in Path(part).parts:
            if len(os.fsencode(component)) > NAME_MAX_BYTES:
                raise UnsafePathError(f"{path}: the name {_shown(component)} is longer than {NAME_MAX_BYTES} bytes; "
                                      "use shorter names")
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{path} would be written outside the output directory {root} (it resolves to {real}); "
                              "nothing was written there: use plain names and no symlinks leading out of it")
    return path
