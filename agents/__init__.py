"""Everything that chooses a steering command: privileged experts, learned models,
baselines, behind one stable-baselines3 ``predict`` contract."""

from __future__ import annotations

import os

from steerloop.agents.baselines import ZerosPolicy
from steerloop.agents.experts import ExpertPolicy

BUILTIN_POLICIES = ("expert", "expert:stanley", "expert:pure_pursuit", "zeros")


def load_policy(name: str):
    """A policy from its command-line name: ``expert`` (default law), ``expert:LAW``,
    ``zeros``, a checkpoint directory, or a stable-baselines3 model ``.zip``."""
    if name == "zeros":
        return ZerosPolicy()
    if name == "expert":
        return ExpertPolicy()
    if name.startswith("expert:"):
        return ExpertPolicy(name.split(":", 1)[1])
    if name.endswith(".zip"):
        from steerloop.agents.sb3 import SB3Policy

        return SB3Policy(name)
    if os.path.exists(name):
        from steerloop.agents.checkpoint import load_policy_from_checkpoint

        return load_policy_from_checkpoint(name)
    raise ValueError(f"unknown policy {name!r}: use one of {BUILTIN_POLICIES} or a checkpoint directory "
                     "(a path that does not exist was given)")
