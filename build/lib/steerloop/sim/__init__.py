"""steerloop's world: tracks, the PyBullet scene and vehicle, cameras, the gymnasium
environment and its wrappers, and the driving-log format.

The environment ``steerloop/LaneKeep-v0`` is registered by ``import steerloop`` (which any
``import steerloop.sim`` runs first).
"""

import os
import sys

from steerloop import ENV_ID, ENV_ID_PREFIXED, MAX_EPISODE_STEPS

__all__ = ["ENV_ID", "ENV_ID_PREFIXED", "MAX_EPISODE_STEPS"]


def _import_pybullet_quietly() -> None:
    """Import pybullet with file descriptor 2 silenced: its C module prints
    "pybullet build time: ..." to stderr on import, which would stand before every one-line
    error message of the command line."""
    if "pybullet" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        import pybullet  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_import_pybullet_quietly()
