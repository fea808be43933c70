"""Driving logs: durable, reproducible on-disk recordings of driving (docs/driving-log.md).

A driving log is a directory with one HDF5 file per episode and a ``manifest.json``; every
episode file is plain HDF5 readable with ``h5py`` alone. The format is data, not simulation:
this package depends on nothing else of steerloop's but its error base and file helpers.

- :mod:`~steerloop.driving_log.schema`: the format version, the per-step series, file names.
- :mod:`~steerloop.driving_log.integrity`: checksums (with a verification cache) and locks.
- :mod:`~steerloop.driving_log.writer`: :class:`EpisodeBuffer`, :class:`DrivingLogWriter`.
- :mod:`~steerloop.driving_log.reader`: :class:`DrivingLog`.
- :mod:`~steerloop.driving_log.validation`: :func:`validate` (``steerloop validate``).
"""

from steerloop.driving_log.reader import DrivingLog
from steerloop.driving_log.schema import (
    FRAME_COMPRESSION,
    FRAME_COMPRESSION_LEVEL,
    MANIFEST,
    SCALAR_FIELDS,
    SCHEMA_VERSION,
    CorruptEpisodeError,
    FieldSpec,
    LogError,
    episode_file,
)
from steerloop.driving_log.validation import validate
from steerloop.driving_log.writer import DrivingLogWriter, EpisodeBuffer

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
