"""Tests for sim.wrappers: scripted perturbations and NVIDIA-style interventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import straight_spec

from steerloop.sim.wrappers import (
    PHASE_ACTING,
    PHASE_NONE,
    PHASE_RECOVERY,
    PUSH_OFFSET,
    PUSH_STEPS,
    RECOVERY_WINDOW,
    InterventionWrapper,
    Perturbation,
    PerturbationWrapper,
)

ZERO = np.zeros(1, np.float32)


def _expert_action(info) -> np.ndarray:
    return np.array([info["expert_steering"]], np.float32)


# ---------------------------------------------------------------- Perturbation
def test_standard_perturbations():
    push, kick, pulse = Perturbation.push(10), Perturbation.kick(10, -5.0), Perturbation.pulse(10)
    assert (push.kind, push.magnitude, push.duration, push.end_step) == ("lateral_push", PUSH_OFFSET, PUSH_STEPS, 35)
    assert (kick.kind, kick.magnitude, kick.duration) == ("heading_kick", -5.0, 1)
    assert (pulse.kind, pulse.magnitude) == ("steering_pulse", 0.2)
    assert Perturbation(**push.to_dict()) == push


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="shove", start_step=1, magnitude=1.0, duration=1), "kind"),
    (dict(kind="lateral_push", start_step=0, magnitude=1.0, duration=1), "start_step"),
    (dict(kind="lateral_push", start_step=1, magnitude=1.0, duration=0), "duration"),
    (dict(kind="lateral_push", start_step=1, magnitude=0.0, duration=1), "magnitude"),
    (dict(kind="lateral_push", start_step=1, magnitude=float("nan"), duration=1), "magnitude"),
    (dict(kind="steering_pulse", start_step=1, magnitude=1.5, duration=1), r"\[-1, 1\]"),
])
def test_invalid_perturbations_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Perturbation(**kwargs)


def test_overlapping_perturbations_rejected(make_env):
    env = make_env()
    with pytest.raises(ValueError, match="overlap"):
        PerturbationWrapper(env, [Perturbation.push(10), Perturbation.pulse(20)])  # push acts on 10..34
    with pytest.raises(ValueError, match="overlap"):  # order given does not matter
        PerturbationWrapper(env, [Perturbation.pulse(20), Perturbation.push(10)])
    PerturbationWrapper(env, [Perturbation.push(10), Perturbation.pulse(35)])  # back to back is fine


# ---------------------------------------------------------------- PerturbationWrapper
def test_phases_and_policy_override(make_env):
    env = PerturbationWrapper(make_env(track=straight_spec(150.0)), [Perturbation.pulse(5)])
    recovery = int(round(RECOVERY_WINDOW / env.unwrapped.dt))
    assert recovery == 100
    _, info = env.reset(seed=0)
    assert (info["perturbation_phase"], info["perturbation_index"], info["policy_overridden"]) == (PHASE_NONE, -1, False)
    phases, indices, overridden, steering, policy = [], [], [], [], []
    for _ in range(4 + 5 + recovery + 5):  # 4 before, 5 acting, the window, 5 after
        action = _expert_action(info)
        _, _, terminated, truncated, info = env.step(action)
        assert not (terminated or truncated)
        phases.append(info["perturbation_phase"])
        indices.append(info["perturbation_index"])
        overridden.append(info["policy_overridden"])
        steering.append(info["steering"])
        policy.append(float(action[0]))
    # steps are 1-based: step k is phases[k - 1]
    assert phases[:4] == [PHASE_NONE] * 4
    assert phases[4:9] == [PHASE_ACTING] * 5
    assert phases[9:9 + recovery] == [PHASE_RECOVERY] * recovery
    assert phases[9 + recovery:] == [PHASE_NONE] * 5
    assert indices == [-1] * 4 + [0] * (5 + recovery) + [-1] * 5
    assert overridden == [p == PHASE_ACTING for p in phases]
    held = steering[3]  # the command executed on the step before the pulse
    for k, (executed, wanted, forced) in enumerate(zip(steering, policy, overridden)):
        if forced:  # the pulse adds its magnitude to the command held when it started
            assert executed == pytest.approx(held + 0.2, abs=1e-6), k
        else:
            assert executed == pytest.approx(wanted), k


def test_reset_restarts_the_schedule(make_env):
    env = PerturbationWrapper(make_env(track=straight_spec(150.0)), [Perturbation.pulse(2)])
    for _ in range(2):
        env.reset(seed=0)
        _, _, _, _, info = env.step(ZERO)
        assert info["perturbation_phase"] == PHASE_NONE
        _, _, _, _, info = env.step(ZERO)
        assert info["perturbation_phase"] == PHASE_ACTING


@pytest.mark.parametrize("magnitude", [PUSH_OFFSET, -PUSH_OFFSET])
@pytest.mark.parametrize("policy", ["zeros", "expert"])
def test_lateral_push_moves_car_by_magnitude(make_env, magnitude, policy):
    push = Perturbation.push(10, magnitude)
    env = PerturbationWrapper(make_env(track=straight_spec(150.0)), [push])
    _, info = env.reset(seed=0)
    offsets, speeds, progress = {}, {}, {}
    for step in range(1, push.end_step + 1):
        action = ZERO if policy == "zeros" else _expert_action(info)
        _, _, _, _, info = env.step(action)
        offsets[step], speeds[step], progress[step] = info["lateral_offset"], info["speed"], info["progress"]
        assert info["policy_overridden"] == (push.start_step <= step < push.end_step)
    # the push moves the car sideways only: it keeps its 10 m/s and covers 0.5 m per step
    # (PyBullet's resetBasePositionAndOrientation zeroes the velocity; the push must put it back)
    assert min(speeds.values()) == pytest.approx(10.0, abs=0.05)
    assert progress[push.end_step - 1] - progress[push.start_step - 1] == pytest.approx(
        0.5 * push.duration, abs=0.05)
    assert abs(offsets[push.start_step - 1]) < 0.02  # centred before the push
    end = push.end_step - 1  # last step of the push
    assert offsets[end] == pytest.approx(magnitude, abs=0.15)
    # smooth: the displacement grows monotonically, without jumps
    during = np.array([offsets[k] for k in range(push.start_step - 1, end + 1)]) * np.sign(magnitude)
    assert np.all(np.diff(during) > -1e-3)
    assert np.abs(np.diff(during)).max() < 0.1


@pytest.mark.parametrize("degrees", [5.0, -5.0])
def test_heading_kick_changes_heading_on_that_step(make_env, degrees):
    kick = Perturbation.kick(10, degrees)
    env = PerturbationWrapper(make_env(track=straight_spec(150.0)), [kick])
    env.reset(seed=0)
    headings = []
    for _ in range(kick.start_step):
        _, _, _, _, info = env.step(ZERO)
        headings.append(info["heading_error"])
    assert info["perturbation_phase"] == PHASE_ACTING and info["policy_overridden"]
    assert headings[-1] - headings[-2] == pytest.approx(math.radians(degrees), abs=0.01)
    assert abs(headings[-2]) < 1e-3
    _, _, _, _, info = env.step(ZERO)
    assert info["perturbation_phase"] == PHASE_RECOVERY
    assert info["heading_error"] == pytest.approx(math.radians(degrees), abs=0.01)  # no policy action yet


def test_perturbation_inside_an_earlier_recovery_window_still_acts(make_env):
    # A kick 10 steps after a push ends falls in the push's 5 s recovery window: it acts, and
    # the window that follows is the kick's.
    env = PerturbationWrapper(make_env(track=straight_spec(150.0)), [Perturbation.push(2), Perturbation.kick(37)])
    env.reset(seed=0)
    phases = [env.step(ZERO)[4] for _ in range(40)]
    summary = [(i["perturbation_index"], i["perturbation_phase"]) for i in phases]
    assert summary[26:35] == [(0, PHASE_RECOVERY)] * 9  # steps 27..35: the push's window
    assert summary[36] == (1, PHASE_ACTING) and phases[36]["policy_overridden"]  # step 37: the kick
    assert summary[37:] == [(1, PHASE_RECOVERY)] * 3
    assert phases[36]["heading_error"] - phases[35]["heading_error"] > math.radians(4.0)


# ---------------------------------------------------------------- InterventionWrapper
def test_intervention_threshold_must_be_positive(make_env):
    with pytest.raises(ValueError, match="threshold"):
        InterventionWrapper(make_env(), threshold=0.0)


def test_interventions_put_car_back_and_episode_goes_on(make_env):
    env = InterventionWrapper(make_env(track=straight_spec(300.0)))
    _, info = env.reset(seed=0)
    assert info["intervention"] is False and info["interventions"] == 0
    count, previous_intervened = 0, False
    for step in range(1, 121):
        _, _, terminated, truncated, info = env.step(np.array([0.3], np.float32))
        assert not info["off_road"], f"off road at step {step}"
        assert not terminated and not truncated
        assert abs(info["lateral_offset"]) <= 1.0 + 1e-9
        if previous_intervened:  # the next step starts again from the centre line
            assert abs(info["lateral_offset"]) < 0.1
        if info["intervention"]:
            count += 1
            assert info["offset_before_intervention"] > 1.0  # steering left drifted it out to the left
            assert info["lateral_offset"] == pytest.approx(0.0, abs=0.02)
            assert info["heading_error"] == pytest.approx(0.0, abs=0.01)
            assert info["rear_heading_error"] == pytest.approx(0.0, abs=0.01)
            assert info["speed"] > 5.0
        assert info["interventions"] == count
        previous_intervened = info["intervention"]
    assert count >= 3
    assert info["progress"] > 30.0


def test_intervention_refreshes_the_side_camera_frames(make_env):
    """After the car is put back, info["frames"] shows it where the observation does."""
    env = InterventionWrapper(make_env(track=straight_spec(300.0), cameras=("center", "left")))
    _, info = env.reset(seed=0, options={"start_offset": 0.98})
    for _ in range(40):
        obs, _, _, _, info = env.step(np.array([0.3], np.float32))
        if info["intervention"]:
            break
    assert info["intervention"]
    base = env.unwrapped
    np.testing.assert_array_equal(obs["image"], base.current_observation()["image"])
    np.testing.assert_array_equal(info["frames"]["left"], base.extra_frames()["left"])
    # ... which is the car on the centre line: the same picture as a car started there.
    replay = make_env(track=straight_spec(300.0), cameras=("center", "left"))
    _, replay_info = replay.reset(seed=0, options={"start_s": info["progress"]})
    left, fresh = info["frames"]["left"].astype(int), replay_info["frames"]["left"].astype(int)
    assert np.abs(left - fresh).mean() < 2.0
