"""steerloop's world: tracks, the PyBullet scene and vehicle, cameras, the gymnasium
environment and its wrappers, and the driving-log format.

The environment ``steerloop/LaneKeep-v0`` is registered by ``import steerloop`` (which any
``import steerloop.sim`` runs first).
"""

from steerloop import ENV_ID, ENV_ID_PREFIXED, MAX_EPISODE_STEPS

__all__ = ["ENV_ID", "ENV_ID_PREFIXED", "MAX_EPISODE_STEPS"]
