"""Reading: :class:`DrivingLog` opens a driving log (optionally verifying every checksum first)
and serves episodes and windows of them."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence

import h5py
import numpy as np

from steerloop.driving_log.schema import (
    CorruptEpisodeError, LogError, MANIFEST, SCALAR_FIELDS, _DEFAULT_MAX_OPEN, _read_manifest, episode_file,
)
from steerloop.driving_log.integrity import _file_problem


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
