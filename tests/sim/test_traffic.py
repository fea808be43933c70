"""Moving vehicles (issue 19, sim/traffic.py): oncoming cars in the other lane and a lead car in
the ego lane, kinematic and visual only. They follow their lanes, are seen by the camera and the
semantic mask, are bit-identical per seed and across copies, and never change the ego car's
trajectory: with and without them, only the pixels where a car is seen differ."""

from __future__ import annotations

import copy
import hashlib
import math
import pickle

import numpy as np
import pytest
from helpers import SHORT_SPEC, TINY

from steerloop.sim import conditions
from steerloop.sim.env import LaneKeepEnv
from steerloop.sim.scene import VEHICLE
from steerloop.sim.traffic import CAR_LENGTH, ONCOMING_BODIES

# Meadow (no roadside objects, no parked cars) with dense oncoming traffic and a lead car: every
# vehicle pixel is a moving car, and the road is drawn exactly as in `default`.
BUSY = {"scenery": {"busy": {"base": "meadow", "traffic": 40.0, "traffic_speed": 8.0},
                    "busy-lead": {"base": "meadow", "traffic": 40.0, "traffic_speed": 8.0, "lead_gap": 12.0}}}


def make(condition: str = "busy.noon", **config) -> LaneKeepEnv:
    return LaneKeepEnv(**{"track": SHORT_SPEC, "resolution": TINY, "condition": condition, "condition_file": BUSY,
                          "extra_observations": ("semantic",), **config})


def drive(env, steps: int, seed: int | None = 3) -> list[tuple]:
    """(image bytes, semantic, info) of each step driven by the expert (after a reset when ``seed``)."""
    if seed is not None:
        env.reset(seed=seed)
    out = []
    for _ in range(steps):
        obs, *_, info = env.step(np.array([env.expert_command()], np.float32))
        out.append((obs["image"].tobytes(), obs["semantic"][..., 0].copy(), info))
    return out


def digest(run) -> str:
    return hashlib.sha256(b"".join(image for image, _, _ in run)).hexdigest()


def test_frames_are_bit_identical_per_seed_and_across_copies():
    first, second = make(), make()
    try:
        second.reset(seed=9, options={"condition": "town-traffic.rain.dashcam"})  # other bodies first
        assert digest(drive(first, 30)) == digest(drive(second, 30))
        assert digest(drive(first, 30, seed=4)) != digest(drive(second, 30, seed=3))  # cars drawn per seed
        twins = [copy.deepcopy(first), pickle.loads(pickle.dumps(first))]
        try:
            runs = [digest(drive(env, 20, seed=None)) for env in (first, *twins)]
        finally:
            for twin in twins:
                twin.close()
        assert runs[0] == runs[1] == runs[2]
    finally:
        first.close()
        second.close()


def test_ego_trajectory_is_unchanged_and_only_car_pixels_differ():
    runs = {}
    for condition in ("flat", "busy-lead.noon"):
        env = make(condition)
        try:
            runs[condition] = drive(env, 80, seed=5)
        finally:
            env.close()
    seen = 0
    for (plain, _, plain_info), (busy, mask, busy_info) in zip(runs["flat"], runs["busy-lead.noon"]):
        assert {k: v for k, v in plain_info.items() if k not in ("condition", "frames")} == \
            {k: v for k, v in busy_info.items() if k not in ("condition", "frames")}  # bit for bit
        changed = np.any(np.frombuffer(plain, np.uint8).reshape(*TINY, 3)
                         != np.frombuffer(busy, np.uint8).reshape(*TINY, 3), axis=2)
        assert not np.any(changed & (mask != VEHICLE))  # only where a car is seen
        seen += int(changed.any())
    assert seen > 40  # the lead car is in view nearly all the time


def _body_lane_states(env) -> list:
    states = []
    for body in env.traffic_bodies.oncoming:
        (x, y, _), orientation = env.client.getBasePositionAndOrientation(body)
        yaw = env.client.getEulerFromQuaternion(orientation)[2]
        states.append(env.track.lane_state(x, y, yaw))
    return states


def test_oncoming_cars_follow_the_other_lane_towards_the_ego_car():
    env = make()
    try:
        env.reset(seed=1)
        lane_width = env.track.lane_width
        previous = None
        for _ in range(60):  # over the straight and into the arc
            env.step(np.array([env.expert_command()], np.float32))
            states = _body_lane_states(env)
            on_road = [st for st in states if 0.0 < st.s < env.track.length]
            assert len(states) == ONCOMING_BODIES and on_road
            for state in on_road:
                assert state.offset == pytest.approx(lane_width, abs=0.01)  # + = left: the other lane's centre
                assert abs(abs(state.heading_error) - math.pi) < 1e-3  # driving against the ego car
            progress = {body: st.s for body, st in zip(env.traffic_bodies.oncoming, states)}
            if previous is not None:  # each body moves 8 m/s x 0.05 s towards the car, unless recycled ahead
                moved = [progress[b] - previous[b] for b in progress
                         if 0.0 < min(previous[b], progress[b]) and max(previous[b], progress[b]) < env.track.length]
                assert any(m == pytest.approx(-0.4, abs=1e-3) for m in moved)
                assert all(m == pytest.approx(-0.4, abs=1e-3) or m > 0 for m in moved)
            previous = progress
    finally:
        env.close()


def test_cars_are_seen_approaching_and_the_lead_car_stays_ahead():
    env = make()
    try:
        counts = [int(np.count_nonzero(mask == VEHICLE)) for _, mask, _ in drive(env, 40, seed=2)]
    finally:
        env.close()
    plain = make("flat")
    try:
        assert all(not np.any(mask == VEHICLE) for _, mask, _ in drive(plain, 40, seed=2))
    finally:
        plain.close()
    nearest = int(np.argmax(counts))
    assert counts[nearest] >= 4 and counts[nearest] > counts[max(nearest - 10, 0)]  # a car grows as it nears

    lead = make("busy-lead.noon")
    try:
        lead.reset(seed=2)
        for _ in range(400):
            _, _, terminated, _, info = lead.step(np.array([lead.expert_command()], np.float32))
            (x, y, _), _ = lead.client.getBasePositionAndOrientation(lead.traffic_bodies.lead)
            state = lead.track.lane_state(x, y, 0.0, s_hint=info["progress"] + 20.0)
            if state.s < lead.track.length:
                assert state.offset == pytest.approx(0.0, abs=0.01)  # in the ego lane
                assert state.s - info["progress"] == pytest.approx(12.0 + (4.5 + CAR_LENGTH) / 2, abs=0.01)
            if terminated:
                break
        assert info["success"] and info["departures"] == 0
    finally:
        lead.close()


def test_bodies_are_a_fixed_few_whatever_the_distance():
    env = make("busy-lead.noon")
    try:
        env.reset(seed=0, options={"condition": "flat"})
        plain = env.client.getNumBodies()
        env.reset(seed=0)
        assert env.client.getNumBodies() == plain + ONCOMING_BODIES + 1
        drive(env, 140, seed=None)  # twice as many cars as bodies pass
        assert len(env.traffic.entries) >= 2 * ONCOMING_BODIES
        assert env.client.getNumBodies() == plain + ONCOMING_BODIES + 1
        env.reset(seed=0, options={"condition": "flat"})
        assert env.client.getNumBodies() == plain and env.traffic is None and env.traffic_bodies is None
    finally:
        env.close()


def test_condition_file_identities_name_traffic_only_when_used(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[scenery.quiet]\nbase = "suburban"\n[scenery.busy]\nbase = "suburban"\ntraffic = 10\n'
                    '[conditions.q]\nscenery = "quiet"\nweather = "noon"\n'
                    '[conditions.b]\nscenery = "busy"\nweather = "noon"\n')
    values = conditions.read_condition_file(path).values(["q", "b"])
    assert not {"traffic", "traffic_speed", "lead_gap"} & set(values["q"]["scenery"])  # as before traffic existed
    assert values["b"]["scenery"]["traffic"] == 10.0
    rebuilt = conditions.conditions_from_content(conditions.content_from_values(values))
    assert rebuilt.scenery["busy"] == conditions.load_condition_file(path).scenery["busy"]


@pytest.mark.parametrize("field, value, match", [
    ("traffic", 60, r"scenery.x.traffic \[oncoming cars per km\]: must be a number in \[0, 50\], got 60"),
    ("traffic_speed", -1, r"scenery.x.traffic_speed \[m/s\]: must be a number in \[0, 30\], got -1"),
    ("lead_gap", 2, r"scenery.x.lead_gap: must be 0 \(no lead car\) or a gap in \[5, 100\] m, got 2"),
    ("traffic", "many", r"scenery.x.traffic \[oncoming cars per km\]: must be a number"),
])
def test_bad_traffic_values_are_refused_naming_the_field(tmp_path, field, value, match):
    path = tmp_path / "mine.json"
    path.write_text(f'{{"scenery": {{"x": {{"{field}": {value!r}}}}}}}'.replace("'", '"'))
    with pytest.raises(conditions.ConditionError, match=match):
        LaneKeepEnv(track=SHORT_SPEC, resolution=TINY, condition_file=str(path))


@pytest.mark.parametrize("field, value", [("traffic", 60.0), ("traffic_speed", -1.0), ("lead_gap", 2.0)])
def test_bad_traffic_values_in_code_are_refused_naming_the_field(field, value):
    with pytest.raises(conditions.ConditionError, match=rf"Scenery.{field} must be .*got {value}"):
        conditions.Scenery(**{field: value})


def test_a_restart_from_a_logged_state_shows_the_cars_of_the_log():
    """The short loop's restart (logged progress, offset, ..., and time) puts the cars where they were."""
    from steerloop.evaluation.short_loop import logged_start

    env = make("busy-lead.noon")
    try:
        obs, info = env.reset(seed=6)
        rows, frames, bodies, steering = [info], [obs["image"].copy()], [], []
        for _ in range(30):
            bodies.append([env.client.getBasePositionAndOrientation(b)[0] for b in env.traffic_bodies.ids])
            steering.append(env.expert_command())
            obs, *_, info = env.step(np.array([steering[-1]], np.float32))
            rows.append(info)
            frames.append(obs["image"].copy())
        data = {key: np.array([row[key] for row in rows]) for key in
                ("progress", "lateral_offset", "heading_error", "speed", "wheel_angle", "time")}
        data["steering"] = np.array(steering)
        t = 25
        obs, info = env.reset(seed=6, options=logged_start(data, t))
        assert info["time"] == pytest.approx(t * env.dt)
        restarted = [env.client.getBasePositionAndOrientation(b)[0] for b in env.traffic_bodies.ids]
        np.testing.assert_allclose(restarted, bodies[t], atol=1e-3)  # [m]
        np.testing.assert_array_equal(obs["image"], frames[t])  # the same pixels, cars included
        env.reset(seed=6, options={**logged_start(data, t), "start_time": 0.0})
        moved = [env.client.getBasePositionAndOrientation(b)[0] for b in env.traffic_bodies.oncoming]
        assert not np.allclose(moved, bodies[t][:len(moved)], atol=1.0)  # without the clock they would not be
    finally:
        env.close()
