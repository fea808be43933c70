"""The expert recovers from 100% of standard perturbations in tight curves (closed loop,
through the evaluation runner; the recovery definition is in docs/metrics.md).

25 m is the tightest arc radius of the procedural tracks and of the shipped specs (the spec
format itself only requires radius > 0). On a long 25 m arc a perfect tracker holds a
steady 3.1 deg heading error at the wheelbase midpoint, so under the old midpoint-heading
definition the expert never recovered from a push that ends there; the heading is now
judged at the rear axle, where it is 0 in steady turning.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY

from steerloop.agents import load_policy
from steerloop.evaluation.metrics import RECOVERY_DEADLINE, RECOVERY_HEADING, RECOVERY_HOLD
from steerloop.evaluation.runner import run_group
from steerloop.evaluation.suites import PERTURBATION_SPACING, Scenario
from steerloop.sim.env import END_MARGIN, load_track
from steerloop.sim.track import TRACKS_DIR, split_seed
from steerloop.sim.wrappers import PUSH_STEPS, Perturbation

RADIUS = 25.0  # [m] the tightest arc of generated and shipped tracks
SPEED = 10.0  # [m/s] the suites' default
DT = 0.05  # [s] control step at 20 Hz
FIRST_START = 30  # [steps] earliest start in the sweep (1.5 s, 15 m: every track starts with >= 10 m of straight)
JUDGED = PUSH_STEPS + int(round((RECOVERY_DEADLINE + RECOVERY_HOLD) / DT))  # [steps] a push and its full judging window
STANDARD = (Perturbation.push, Perturbation.kick, Perturbation.pulse)


def spec(name: str, angles, straights: float = 10.0) -> dict:
    """25 m arcs turning by ``angles`` [deg] (+ = left) between two ``straights`` m straights."""
    return {"name": name, "lane_width": 3.7, "segments": [{"type": "straight", "length": straights}] + [
        {"type": "arc", "radius": RADIUS, "angle": a} for a in angles] + [{"type": "straight", "length": straights}]}


def recovery_events(scenarios: list[Scenario]) -> list[tuple[Perturbation, dict, dict]]:
    """(perturbation, its recovery event, the trajectory) of every perturbation of
    ``scenarios``, driven by the privileged expert through the evaluation runner."""
    expert = load_policy("expert")
    events = []
    for k in range(0, len(scenarios), 8):  # lockstep groups of 8 (batched expert)
        group = scenarios[k:k + 8]
        for scenario, (metrics, trajectory) in zip(group, run_group(expert, group, resolution=TINY)):
            assert not metrics["off_road"] and metrics["departures"] == 0, scenario.name
            events += [(q, event, trajectory) for q, event in zip(scenario.perturbations, metrics["recovery_events"])]
    return events


def assert_all_recovered(events) -> None:
    assert all(e["reached"] for _, e, _ in events)
    failed = [f"{q.kind}{q.magnitude:+g}@{q.start_step}" for q, e, _ in events if not e["recovered"]]
    assert not failed, f"{len(failed)}/{len(events)} not recovered: {failed}"


# ----------------------------------------------------------------------------- default suite
def test_expert_recovers_from_pushes_ending_in_25m_arcs_and_chicanes():
    # Push inwards (the side where the old definition failed) on a 180 deg arc each way, and
    # both ways in an S-chicane whose curvature reverses 2 s after the push: it starts at
    # step 30 (s = 15 m, the arc's transition ends at 15 m) and ends at s = 27.5 m.
    push = Perturbation.push(30)
    scenarios = [Scenario(name=name, track=spec(name, angles), speed=SPEED, seed=0,
                          perturbations=(Perturbation(push.kind, push.start_step, magnitude, push.duration),))
                 for name, angles, magnitude in (("left-arc", [180], 0.5), ("right-arc", [-180], -0.5),
                                                 ("chicane", [90, -90], 0.5), ("chicane", [90, -90], -0.5))]
    events = recovery_events(scenarios)
    assert len(events) == 4
    assert_all_recovered(events)
    for _, event, trajectory in events[:2]:
        release = push.end_step - 1
        sign = np.sign(trajectory["curvature"][release])
        assert trajectory["curvature"][release] == pytest.approx(sign / RADIUS), "the push must end in the arc"
        # settled in the arc: the midpoint heading error (the old criterion) stays beyond 3 deg ...
        held = slice(release + 60, release + 100)
        assert np.all(np.abs(np.degrees(trajectory["heading_error"][held])) > RECOVERY_HEADING)
        assert np.all(-sign * np.degrees(trajectory["heading_error"][held]) == pytest.approx(3.07, abs=0.1))
        # ... the rear axle's is near 0, and the midpoint holds 0.10 m inside the arc
        assert np.all(np.abs(np.degrees(trajectory["rear_heading_error"][held])) < 0.3)
        assert np.all(sign * trajectory["lateral_offset"][held] == pytest.approx(0.10, abs=0.02))
        assert event["recovery_time_s"] <= 2.0


# ----------------------------------------------------------------------------- the broad sweep
def sweep_scenarios(name: str, track, phase_step: int) -> list[Scenario]:
    """Every standard perturbation (push, kick, pulse; both signs) starting at FIRST_START +
    phase, then every PERTURBATION_SPACING steps (as the ``recovery`` suite spaces them), for
    phases 0, phase_step, ... < PERTURBATION_SPACING: one scenario per kind, sign and phase,
    so perturbations start every ``phase_step`` steps along the route, each early enough to
    be judged over its full window before the route ends."""
    road = load_track(track)
    value = track if isinstance(track, int) else road.to_spec()
    last_start = int((road.length - END_MARGIN) / (SPEED * DT)) - JUDGED
    scenarios = []
    for phase in range(0, PERTURBATION_SPACING, phase_step):
        starts = range(FIRST_START + phase, last_start + 1, PERTURBATION_SPACING)
        for make in STANDARD:
            for sign in (1, -1):
                schedule = []
                for start in starts:
                    base = make(start)
                    schedule.append(Perturbation(base.kind, start, sign * base.magnitude, base.duration))
                if schedule:
                    scenarios.append(Scenario(name=f"{name}-{base.kind}{sign:+d}-{phase}", track=value, speed=SPEED,
                                              perturbations=tuple(schedule), seed=0))
    return scenarios


SWEEP_TRACKS = {
    "left-arc": (spec("left-arc", [180], straights=30.0), 10),
    "right-arc": (spec("right-arc", [-180], straights=30.0), 10),
    "chicane": (spec("chicane", [90, -90, 90, -90], straights=30.0), 20),
    "tight-25m": (str(TRACKS_DIR / "tight-25m.json"), 20),
    "s-bend": (str(TRACKS_DIR / "s-bend.json"), 20),
    "test-0": (split_seed("test", 0), 40),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWEEP_TRACKS))
def test_expert_recovers_from_every_standard_perturbation_on_tight_tracks(name):
    track, phase_step = SWEEP_TRACKS[name]
    events = recovery_events(sweep_scenarios(name, track, phase_step))
    assert len(events) >= 24
    assert_all_recovered(events)
    if name != "test-0":  # the sweep reaches the tightest curve: perturbations end inside its 25 m arc
        assert sum(abs(t["curvature"][q.end_step - 1]) == pytest.approx(1 / RADIUS) for q, _, t in events) >= 2
