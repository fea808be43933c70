"""steerloop's world: tracks, the PyBullet scene and vehicle, cameras, the gymnasium
environment and its wrappers, and the driving-log format.

Importing ``sim`` registers ``steerloop/LaneKeep-v0`` with gymnasium.
"""

import gymnasium

ENV_ID = "steerloop/LaneKeep-v0"
MAX_EPISODE_STEPS = 3000  # [control steps] = 150 s at 20 Hz

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="sim.env:LaneKeepEnv", max_episode_steps=MAX_EPISODE_STEPS)
