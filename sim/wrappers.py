"""Wrappers that script what happens to the car: perturbations and NVIDIA-style interventions.

Both wrap a :class:`sim.env.LaneKeepEnv` (possibly inside gymnasium's own wrappers) and
add their bookkeeping to ``info``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np

PERTURBATION_KINDS = ("lateral_push", "heading_kick", "steering_pulse")
PHASE_NONE, PHASE_ACTING, PHASE_RECOVERY = 0, 1, 2
RECOVERY_WINDOW = 5.0  # [s] after a perturbation ends, the policy's recovery is judged over this window
PUSH_OFFSET = 0.5  # [m] standard lateral push (comma.ai's 0.5 m over 25 steps)
PUSH_STEPS = 25  # [control steps]
KICK_DEGREES = 5.0  # [deg] standard heading kick
PULSE_COMMAND = 0.2  # [-] standard steering pulse, added to the command held when it starts ...
PULSE_STEPS = 5  # ... held for this many control steps
INTERVENTION_THRESHOLD = 1.0  # [m] |offset| that triggers an intervention (NVIDIA)


@dataclass(frozen=True)
class Perturbation:
    """One scripted perturbation; the policy is overridden while it acts.

    - ``lateral_push``: the car is displaced smoothly (smoothstep profile) ``magnitude``
      metres sideways (+ = left) over ``duration`` steps while the expert law steers along
      the displaced line, as comma.ai forces a 0.5 m offset over 25 steps;
    - ``heading_kick``: the car's heading is rotated by ``magnitude`` degrees at once
      (+ = left); the steering command is held for ``duration`` steps;
    - ``steering_pulse``: the command held when the pulse starts plus ``magnitude`` is forced
      for ``duration`` steps (a jerk of the wheel on top of whatever the curve needs).
    """

    kind: str
    start_step: int
    magnitude: float
    duration: int

    def __post_init__(self):
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"perturbation kind must be one of {PERTURBATION_KINDS}, got {self.kind!r}")
        if not (isinstance(self.start_step, int) and self.start_step >= 1):
            raise ValueError(f"perturbation start_step must be an integer >= 1, got {self.start_step!r}")
        if not (isinstance(self.duration, int) and self.duration >= 1):
            raise ValueError(f"perturbation duration must be an integer >= 1 step, got {self.duration!r}")
        if not math.isfinite(self.magnitude) or self.magnitude == 0:
            raise ValueError(f"perturbation magnitude must be finite and non-zero, got {self.magnitude!r}")
        if self.kind == "steering_pulse" and abs(self.magnitude) > 1:
            raise ValueError(f"steering_pulse magnitude is a normalised command offset in [-1, 1], "
                             f"got {self.magnitude}")

    @property
    def end_step(self) -> int:
        return self.start_step + self.duration

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def push(cls, start_step: int, offset: float = PUSH_OFFSET) -> Perturbation:
        return cls("lateral_push", start_step, offset, PUSH_STEPS)

    @classmethod
    def kick(cls, start_step: int, degrees: float = KICK_DEGREES) -> Perturbation:
        return cls("heading_kick", start_step, degrees, 1)

    @classmethod
    def pulse(cls, start_step: int, command: float = PULSE_COMMAND) -> Perturbation:
        return cls("steering_pulse", start_step, command, PULSE_STEPS)


def _smoothstep(u: float) -> float:
    u = min(max(u, 0.0), 1.0)
    return u * u * (3.0 - 2.0 * u)


class PerturbationWrapper(gym.Wrapper):
    """Applies a schedule of :class:`Perturbation` s, overriding the policy while each acts.

    ``info`` gains ``perturbation_phase`` (0 none, 1 acting, 2 within the recovery
    window after one), ``perturbation_index`` (-1 when none) and ``policy_overridden``.
    Perturbations must not overlap.
    """

    def __init__(self, env: gym.Env, perturbations: list[Perturbation]):
        super().__init__(env)
        ordered = sorted(perturbations, key=lambda q: q.start_step)
        for a, b in zip(ordered, ordered[1:]):
            if b.start_step < a.end_step:
                raise ValueError(f"perturbations overlap: {a} and {b}; space them at least `duration` steps apart")
        self.perturbations = ordered
        self.recovery_steps = int(round(RECOVERY_WINDOW / env.unwrapped.dt))
        self.step_count = 0
        self._push_origin = 0.0
        self._held_command = 0.0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.step_count = 0
        self._held_command = 0.0
        info.update(perturbation_phase=PHASE_NONE, perturbation_index=-1, policy_overridden=False)
        return obs, info

    def _active(self, step: int) -> tuple[int, int]:
        """(index, phase) of the perturbation that governs control step ``step`` (1-based).

        A perturbation acting wins over an earlier one's recovery window (which it cuts
        short); otherwise the latest recovery window that covers ``step``."""
        for index, q in enumerate(self.perturbations):
            if q.start_step <= step < q.end_step:
                return index, PHASE_ACTING
        for index in reversed(range(len(self.perturbations))):
            q = self.perturbations[index]
            if q.end_step <= step < q.end_step + self.recovery_steps:
                return index, PHASE_RECOVERY
        return -1, PHASE_NONE

    def step(self, action):
        base = self.env.unwrapped
        step = self.step_count + 1
        index, phase = self._active(step)
        overridden = phase == PHASE_ACTING
        if overridden:
            q = self.perturbations[index]
            action = np.array(action, dtype=np.float32, copy=True).reshape(-1)
            k = step - q.start_step  # 0 .. duration-1
            if q.kind == "lateral_push":
                # The car is displaced along a smooth profile while the expert steers along the
                # displaced line, so it ends the push offset by `magnitude` and aligned with the road.
                if k == 0:
                    self._push_origin = base.lane.offset
                target = self._push_origin + q.magnitude * _smoothstep((k + 1) / q.duration)
                base.shift_lateral(target - base.lane.offset)
                action[0] = base.expert_command(target_offset=target)
            elif q.kind == "heading_kick":
                if k == 0:
                    base.kick_heading(math.radians(q.magnitude))
                    self._held_command = base.last_command
                action[0] = self._held_command
            else:
                if k == 0:
                    self._held_command = base.last_command
                action[0] = float(np.clip(self._held_command + q.magnitude, -1.0, 1.0))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.step_count = step
        info.update(perturbation_phase=phase, perturbation_index=index, policy_overridden=overridden)
        return obs, reward, terminated, truncated, info


class InterventionWrapper(gym.Wrapper):
    """NVIDIA-style interventions: when |offset| exceeds ``threshold`` the event is counted
    and the car is put back on the centre line at the same progress, heading along the
    road, at its current speed; the episode goes on. ``info`` gains ``intervention``
    (this step) and ``interventions`` (count so far).
    """

    def __init__(self, env: gym.Env, threshold: float = INTERVENTION_THRESHOLD):
        super().__init__(env)
        if not threshold > 0:
            raise ValueError(f"intervention threshold must be > 0 m, got {threshold}")
        self.threshold = threshold
        self.interventions = 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.interventions = 0
        info.update(intervention=False, interventions=0)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        intervened = abs(info["lateral_offset"]) > self.threshold
        if intervened:
            base = self.env.unwrapped
            self.interventions += 1
            info["offset_before_intervention"] = info["lateral_offset"]
            base.place_car(base.s, 0.0, 0.0, speed=max(info["speed"], 0.0))
            base.in_departure = False
            obs = base.current_observation()
            terminated = bool(info["success"])
            info.update(lateral_offset=base.lane.offset, heading_error=base.lane.heading_error,
                        rear_heading_error=base.rear_lane.heading_error, off_road=False,
                        expert_steering=base.expert_command())
            if "frames" in info:  # the side cameras see the car where it was put back, like the observation
                info["frames"] = base.extra_frames()
        info.update(intervention=intervened, interventions=self.interventions)
        return obs, reward, terminated, truncated, info
