"""steerloop: a closed-loop driving testbed.

The repository's top-level folders are this package's subpackages:

- ``steerloop.sim``: the world (tracks, the PyBullet scene and vehicle, cameras, the gymnasium
  environment and its wrappers, the driving-log format).
- ``steerloop.agents``: everything that chooses a steering command (experts, learned models,
  baselines) behind one ``predict`` contract.
- ``steerloop.training``: recording expert driving, behaviour cloning, DAgger, PPO.
- ``steerloop.evaluation``: closed-loop evaluation, offline replay, the regression gate, the
  gap study and the command line.

Importing ``steerloop`` registers the environment ``steerloop/LaneKeep-v0`` with gymnasium
(cheaply: nothing heavy is imported until the environment is made). In a process that has
not imported steerloop (a ``spawn``/``forkserver`` child of a vectorised env), name the
environment with its module prefix so gymnasium imports steerloop first::

    import gymnasium as gym
    import steerloop

    gym.register_envs(steerloop)  # keeps the import (and documents why it is there)
    env = gym.make("steerloop:steerloop/LaneKeep-v0")

The policy contract and the tools for users' own models are exported here, imported on
first use (``import steerloop`` stays light): :class:`Policy` (the protocol),
:class:`PolicyBase` (defaults for its optional capabilities), :class:`ModelPolicy` (a plain
torch model or function as a policy), :func:`load_policy` (a policy from its spec) and
:class:`PolicyError`. See docs/policies.md.
"""

from __future__ import annotations

import gymnasium

__version__ = "0.2.0"

ENV_ID = "steerloop/LaneKeep-v0"
"""The environment's gymnasium id (registered on ``import steerloop``)."""
ENV_ID_PREFIXED = f"steerloop:{ENV_ID}"
"""The id that works in any process, including children that have not imported steerloop."""
MAX_EPISODE_STEPS = 3000  # [control steps] = 150 s at 20 Hz

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="steerloop.sim.env:LaneKeepEnv", max_episode_steps=MAX_EPISODE_STEPS)

_LAZY = {"Policy": "steerloop.agents.protocol", "PolicyBase": "steerloop.agents.protocol",
         "PolicyError": "steerloop.agents.protocol", "ModelPolicy": "steerloop.agents.adapter",
         "load_policy": "steerloop.agents.spec"}
__all__ = ["ENV_ID", "ENV_ID_PREFIXED", "MAX_EPISODE_STEPS", *_LAZY]


def __getattr__(name: str):
    """The policy API, imported on first access (it pulls in numpy, and torch for ModelPolicy)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'steerloop' has no attribute {name!r}")
