"""Everything that chooses a steering command: privileged experts, learned models,
baselines and users' own policies, behind one contract (:class:`Policy`, the
stable-baselines3 ``predict`` contract; see :mod:`steerloop.agents.protocol`)."""

from __future__ import annotations

from steerloop.agents.baselines import ZerosPolicy
from steerloop.agents.experts import ExpertPolicy
from steerloop.agents.protocol import Policy, PolicyBase, PolicyError, policy_capabilities
from steerloop.agents.spec import BUILTIN_POLICIES, load_policy, policy_ref

__all__ = ["BUILTIN_POLICIES", "ExpertPolicy", "Policy", "PolicyBase", "PolicyError", "ZerosPolicy", "load_policy",
           "policy_capabilities", "policy_ref"]
