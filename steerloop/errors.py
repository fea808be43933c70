"""The project's error base and the small checks every file reader shares.

Every error a user can cause by what they pass (a flag, a file, a name) is a
:class:`SteerloopError`; its message is one line that names the input and how to fix it.
The command line prints it as ``steerloop COMMAND: MESSAGE`` and exits 2.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 64 * 2**20  # [bytes] larger "configuration" files are refused before parsing


class SteerloopError(ValueError):
    """A user's input (flag, file, name, value) is wrong; the message says which and how to fix it.

    A ``ValueError`` so that code catching ``ValueError`` keeps working."""


def suggest(key: str, known: Iterable[str]) -> str:
    """``" (did you mean 'speed'?)"`` for a close match of ``key`` among ``known``, else ``""``."""
    match = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(obj: Mapping[str, Any], known: Iterable[str], where: str, error: type[Exception] = SteerloopError
               ) -> None:
    """Refuse the first key of ``obj`` not in ``known``, naming it, ``where`` it is, a close
    match and the valid keys."""
    known = list(known)
    for key in obj:
        if key not in known:
            raise error(f"{where}: unknown key {key!r}{suggest(key, known)}; valid keys are {sorted(known)}")


def parse_json(text: str, where: str, error: type[Exception] = SteerloopError) -> Any:
    """JSON from ``text`` (read from ``where``), refusing documents nested too deeply to be a
    steerloop file (the decoder runs out of recursion on them)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be a steerloop file") from None


def read_json(path: str | Path, what: str = "file", error: type[Exception] = SteerloopError) -> Any:
    """The JSON document in ``path`` (a ``what``: "track spec", "suite", ...), or one clear error:
    missing, a directory, too large, not UTF-8, not JSON, or nested too deeply."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise error(f"{what} {path} {state}; give the path of a JSON file")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise error(f"{what} {path} is {path.stat().st_size / 2**20:.0f} MiB; a {what} is at most "
                    f"{MAX_JSON_BYTES // 2**20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_json(text, f"{what} {path}", error)
