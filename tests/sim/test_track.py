"""Tests for sim.track: geometry against analytic values, lane-frame queries, specs, generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from steerloop.sim.track import (
    SAMPLE_STEP,
    SPLIT_SEED_RANGES,
    TEST,
    TRACKS_DIR,
    TRAIN,
    VAL,
    LaneState,
    Segment,
    Track,
    TrackSpecError,
    generate_track,
    split_seed,
)

ABS = 1e-9  # [m] / [rad] tolerance for closed-form geometry
CLOTHOID_ABS = 1e-6  # [m] required clothoid position accuracy

S_BEND_SPEC = {
    "name": "s-bend",
    "lane_width": 3.7,
    "segments": [
        {"type": "straight", "length": 40},
        {"type": "arc", "radius": 30, "angle": 90},
        {"type": "arc", "radius": 25, "angle": -120},
        {"type": "straight", "length": 30},
    ],
}


def _reference_clothoid_end(length: float, k0: float, k1: float, theta0: float = 0.0) -> tuple[float, float]:
    """End point of a clothoid by fine trapezoidal integration (error ~1e-12 m)."""
    u = np.linspace(0.0, length, 2_000_001)
    theta = theta0 + k0 * u + (k1 - k0) * u * u / (2.0 * length)
    return float(np.trapezoid(np.cos(theta), u)), float(np.trapezoid(np.sin(theta), u))


def _hairpin() -> Track:
    """Two parallel 60 m straights 10 m apart joined by a 180-degree, 5 m radius hairpin."""
    return Track([Segment.straight(60.0), Segment.arc(5.0, 180.0), Segment.straight(60.0)])


# --------------------------------------------------------------------------- geometry
def test_straight_length_and_end_pose():
    track = Track([Segment.straight(50.0)], start=(1.0, 2.0, math.radians(30.0)))
    assert track.length == pytest.approx(50.0)
    x, y, heading = track.pose(track.length)
    assert x == pytest.approx(1.0 + 50.0 * math.cos(math.radians(30.0)), abs=ABS)
    assert y == pytest.approx(2.0 + 50.0 * math.sin(math.radians(30.0)), abs=ABS)
    assert heading == pytest.approx(math.radians(30.0), abs=ABS)
    assert track.curvature_at(10.0) == 0.0


@pytest.mark.parametrize("radius, angle_deg", [(30.0, 90.0), (25.0, -120.0), (200.0, 15.0), (10.0, 270.0)])
def test_arc_end_pose_and_curvature(radius, angle_deg):
    track = Track([Segment.arc(radius, angle_deg)])
    a = math.radians(angle_deg)
    assert track.length == pytest.approx(radius * abs(a))
    x, y, heading = track.pose(track.length)
    # Signed radius: the centre of a left arc is at (0, R), of a right arc at (0, -R).
    r = math.copysign(radius, angle_deg)
    assert x == pytest.approx(r * math.sin(a), abs=ABS)
    assert y == pytest.approx(r * (1.0 - math.cos(a)), abs=ABS)
    assert heading == pytest.approx(a, abs=ABS)
    assert track.curvature_at(0.5 * track.length) == pytest.approx(math.copysign(1.0 / radius, angle_deg))


@pytest.mark.parametrize("length, k0, k1", [(30.0, 0.0, 1 / 25), (12.0, 1 / 30, -1 / 25), (20.0, -0.5, 0.8)])
def test_clothoid_heading_change_and_position(length, k0, k1):
    track = Track([Segment.clothoid(length, k0, k1)], start=(0.0, 0.0, 0.3))
    x, y, heading = track.pose(length)
    assert heading - 0.3 == pytest.approx(0.5 * (k0 + k1) * length, abs=ABS)
    x_ref, y_ref = _reference_clothoid_end(length, k0, k1, theta0=0.3)
    assert x == pytest.approx(x_ref, abs=CLOTHOID_ABS)
    assert y == pytest.approx(y_ref, abs=CLOTHOID_ABS)
    assert track.curvature_at(0.5 * length) == pytest.approx(0.5 * (k0 + k1))


def test_pose_is_vectorised_and_matches_scalar():
    track = Track.from_spec(S_BEND_SPEC)
    s = np.linspace(-5.0, track.length + 5.0, 37)
    xs, ys, hs = track.pose(s)
    ks = track.curvature_at(s)
    assert xs.shape == ys.shape == hs.shape == ks.shape == s.shape
    for i, si in enumerate(s):
        x, y, h = track.pose(float(si))
        assert isinstance(x, float)
        assert (x, y, h) == pytest.approx((xs[i], ys[i], hs[i]), abs=1e-12)
        assert track.curvature_at(float(si)) == pytest.approx(ks[i], abs=1e-12)
    # s is clamped.
    assert track.pose(-5.0) == pytest.approx(track.pose(0.0))
    assert track.pose(track.length + 5.0) == pytest.approx(track.pose(track.length))


def test_dense_samples():
    track = Track.from_spec(S_BEND_SPEC)
    n = len(track.s)
    assert all(len(a) == n for a in (track.x, track.y, track.heading, track.curvature))
    assert all(a.dtype == np.float64 for a in (track.s, track.x, track.y, track.heading, track.curvature))
    assert track.s[0] == 0.0 and track.s[-1] == track.length
    assert np.allclose(np.diff(track.s[:-1]), SAMPLE_STEP)
    assert 0.0 < track.s[-1] - track.s[-2] <= 1.5 * SAMPLE_STEP
    # Chord lengths between samples match the arc length (curvature is small).
    chords = np.hypot(np.diff(track.x), np.diff(track.y))
    assert np.allclose(chords, np.diff(track.s), atol=1e-5)
    with pytest.raises(ValueError):
        track.x[0] = 1.0  # samples are read-only


def test_transitions_preserve_heading_and_length():
    spec = dict(S_BEND_SPEC)
    no_transition = Track.from_spec(spec, transition_length=0.0)
    with_transition = Track.from_spec(spec, transition_length=10.0)
    assert with_transition.length == pytest.approx(no_transition.length, abs=1e-9)
    expected = math.radians(90.0 - 120.0)
    assert with_transition.pose(with_transition.length)[2] == pytest.approx(expected, abs=1e-12)
    assert no_transition.pose(no_transition.length)[2] == pytest.approx(expected, abs=1e-12)
    # straight, T, arc, T, arc, T, straight
    assert [seg.kind for seg in with_transition.segments] == [
        "straight", "clothoid", "arc", "clothoid", "arc", "clothoid", "straight",
    ]
    assert with_transition.segment_of_input == (0, -1, 1, -1, 2, -1, 3)
    assert no_transition.segment_of_input == (0, 1, 2, 3)
    t1 = with_transition.segments[1]
    assert (t1.length, t1.k_start, t1.k_end) == pytest.approx((10.0, 0.0, 1 / 30))
    assert with_transition.segments[0].length == pytest.approx(35.0)
    # Curvature is continuous with transitions.
    assert np.max(np.abs(np.diff(with_transition.curvature))) < 0.01


def test_transition_length_is_capped_by_half_the_neighbours():
    track = Track([Segment.straight(8.0), Segment.arc(20.0, 30.0)], transition_length=10.0)
    assert track.segments[1].kind == "clothoid"
    assert track.segments[1].length == pytest.approx(4.0)  # 0.5 * 8 m
    assert track.segments[0].length == pytest.approx(6.0)
    assert track.length == pytest.approx(8.0 + 20.0 * math.radians(30.0))


def test_constructor_uses_segments_verbatim_by_default():
    segments = [Segment.straight(10.0), Segment.arc(30.0, 45.0)]
    track = Track(segments)
    assert track.segments == tuple(segments)
    assert track.segment_of_input == (0, 1)


# --------------------------------------------------------------------------- lane state
def test_lane_state_on_straight_and_sign_convention():
    track = Track([Segment.straight(100.0)])
    left = track.lane_state(30.0, 1.5, 0.2)
    assert isinstance(left, LaneState)
    assert left.s == pytest.approx(30.0, abs=ABS)
    assert left.offset == pytest.approx(1.5, abs=ABS)  # + = left of travel direction
    assert left.heading_error == pytest.approx(0.2, abs=ABS)
    assert left.curvature == 0.0
    right = track.lane_state(30.0, -1.5, -0.2, s_hint=29.0)
    assert right.offset == pytest.approx(-1.5, abs=ABS)
    assert right.heading_error == pytest.approx(-0.2, abs=ABS)
    # Heading error is wrapped to [-pi, pi).
    wrapped = track.lane_state(30.0, 0.0, 2.0 * math.pi + 0.1)
    assert wrapped.heading_error == pytest.approx(0.1, abs=ABS)


@pytest.mark.parametrize("angle_deg, d", [(90.0, 1.2), (90.0, -0.8), (-90.0, 1.2), (-90.0, -0.8)])
def test_lane_state_on_arc(angle_deg, d):
    radius = 30.0
    track = Track([Segment.arc(radius, angle_deg)])
    sign = math.copysign(1.0, angle_deg)
    phi = math.radians(37.0)  # angle travelled along the arc
    centre = np.array([0.0, sign * radius])
    # Point at radius R + d from the arc centre, at travelled angle phi.
    p = centre + (radius + d) * np.array([math.sin(phi), -sign * math.cos(phi)])
    road_heading = sign * phi
    yaw = road_heading + 0.05
    state = track.lane_state(p[0], p[1], yaw, s_hint=radius * phi + 3.0)
    assert state.s == pytest.approx(radius * phi, abs=1e-7)
    # Outside a left arc is the right side (offset -d); outside a right arc is the left side.
    assert state.offset == pytest.approx(-sign * d, abs=1e-9)
    assert state.heading_error == pytest.approx(0.05, abs=1e-9)
    assert state.road_heading == pytest.approx(road_heading, abs=1e-9)
    assert state.curvature == pytest.approx(sign / radius)


def test_lane_state_on_clothoid_is_perpendicular():
    track = Track([Segment.straight(10.0), Segment.arc(25.0, 60.0)], transition_length=10.0)
    s_true = 10.0  # middle of the transition
    x, y, heading = track.pose(s_true)
    px, py = track.lateral_points(s_true, -1.7)
    state = track.lane_state(px, py, heading, s_hint=s_true)
    assert state.s == pytest.approx(s_true, abs=1e-7)
    assert state.offset == pytest.approx(-1.7, abs=1e-9)
    assert state.heading_error == pytest.approx(0.0, abs=1e-9)


def test_lane_state_hint_stays_on_its_branch_of_a_hairpin():
    track = _hairpin()
    # 6 m left of the outbound straight, 4 m from the return straight.
    global_state = track.lane_state(10.0, 6.0, 0.0)
    assert global_state.s == pytest.approx(60.0 + 5.0 * math.pi + 50.0, abs=1e-7)
    assert global_state.offset == pytest.approx(4.0, abs=1e-9)
    hinted = track.lane_state(10.0, 6.0, 0.0, s_hint=9.0)
    assert hinted.s == pytest.approx(10.0, abs=1e-7)
    assert hinted.offset == pytest.approx(6.0, abs=1e-9)
    # A car drifting left along the outbound branch is tracked continuously.
    s_prev = 0.0
    for x in np.arange(0.0, 55.0, 0.5):
        state = track.lane_state(x, 0.12 * x, 0.0, s_hint=s_prev)
        assert state.s == pytest.approx(x, abs=1e-7)
        s_prev = state.s


def test_lane_state_clamps_before_start_and_after_end():
    track = Track([Segment.straight(20.0), Segment.arc(30.0, 45.0)], start=(0.0, 0.0, 0.0))
    before = track.lane_state(-5.0, 1.0, 0.0, s_hint=0.0)
    assert before.s == 0.0
    assert before.offset == pytest.approx(1.0, abs=ABS)  # perpendicular to the start tangent
    assert track.lane_state(-5.0, 1.0, 0.0).s == 0.0
    x_end, y_end, h_end = track.pose(track.length)
    # 4 m beyond the end along the tangent and 0.5 m to its right.
    px = x_end + 4.0 * math.cos(h_end) + 0.5 * math.sin(h_end)
    py = y_end + 4.0 * math.sin(h_end) - 0.5 * math.cos(h_end)
    after = track.lane_state(px, py, h_end, s_hint=track.length - 1.0)
    assert after.s == track.length
    assert after.offset == pytest.approx(-0.5, abs=1e-9)
    assert track.lane_state(px, py, h_end).s == track.length


def test_lane_state_with_hint_agrees_with_global_search():
    track = generate_track(7)
    rng = np.random.default_rng(0)
    s_true = rng.uniform(0.0, track.length, 200)
    offsets = rng.uniform(-3.0, 3.0, 200)
    px, py = track.lateral_points(s_true, offsets)
    for s, off, x, y in zip(s_true, offsets, px, py):
        hinted = track.lane_state(x, y, 0.0, s_hint=s + rng.uniform(-5.0, 5.0))
        global_ = track.lane_state(x, y, 0.0)
        assert hinted.s == pytest.approx(global_.s, abs=1e-6)
        assert hinted.offset == pytest.approx(global_.offset, abs=1e-6)
        assert hinted.s == pytest.approx(s, abs=1e-6)
        assert hinted.offset == pytest.approx(off, abs=1e-6)


def test_lateral_points():
    track = Track([Segment.straight(10.0)], start=(0.0, 0.0, math.pi / 2))  # heading +y
    x, y = track.lateral_points(4.0, 2.0)
    assert (x, y) == pytest.approx((-2.0, 4.0), abs=ABS)  # left of +y is -x
    xs, ys = track.lateral_points(np.array([0.0, 5.0]), -1.0)
    assert xs == pytest.approx([1.0, 1.0], abs=ABS)
    assert ys == pytest.approx([0.0, 5.0], abs=ABS)


# --------------------------------------------------------------------------- specs
def _spec_with(segment: dict, index: int = 1) -> dict:
    segments = [{"type": "straight", "length": 40}, {"type": "arc", "radius": 30, "angle": 45}]
    segments[index] = segment
    return {"name": "bad", "segments": segments}


@pytest.mark.parametrize(
    "spec, expected",
    [
        (_spec_with({"type": "arc", "radius": -5, "angle": 90}), "segments[1].radius: must be > 0, got -5"),
        (_spec_with({"type": "arc", "radius": 0, "angle": 90}), "segments[1].radius"),
        (_spec_with({"type": "arc", "angle": 90}), "segments[1].radius: missing"),
        (_spec_with({"type": "arc", "radius": "abc", "angle": 90}), "segments[1].radius: must be a finite number"),
        (_spec_with({"type": "arc", "radius": 30, "angle": 0}), "segments[1].angle"),
        (_spec_with({"type": "arc", "radius": 30}), "segments[1].angle: missing"),
        (_spec_with({"type": "straight", "length": 0}, index=0), "segments[0].length: must be > 0"),
        (_spec_with({"type": "straight", "length": -3}, index=0), "segments[0].length"),
        (_spec_with({"type": "straight"}, index=0), "segments[0].length: missing"),
        (_spec_with({"type": "straight", "length": True}, index=0), "segments[0].length"),
        (_spec_with({"type": "clothoid", "length": 10, "k_start": 0}), "segments[1].k_end: missing"),
        (_spec_with({"type": "curve", "length": 10}), "segments[1].type: unknown segment type 'curve'"),
        (_spec_with({"length": 10}), "segments[1].type: missing"),
        (_spec_with("straight"), "segments[1]: must be an object"),
        ({"segments": []}, "segments: must contain at least one segment"),
        ({"name": "x"}, "segments: missing required field"),
        ({"segments": {"type": "straight"}}, "segments: must be a list"),
        ({"lane_width": 0, "segments": [{"type": "straight", "length": 10}]}, "lane_width: must be > 0"),
        ({"lane_width": "wide", "segments": [{"type": "straight", "length": 10}]}, "lane_width"),
        ({"start": {"x": "a"}, "segments": [{"type": "straight", "length": 10}]}, "start.x"),
        ([{"type": "straight", "length": 10}], "spec: must be a JSON object"),
    ],
)
def test_spec_validation_errors_name_the_field(spec, expected):
    with pytest.raises(TrackSpecError) as info:
        Track.from_spec(spec, source="my-track.json")
    message = str(info.value)
    assert expected in message
    assert "(in my-track.json)" in message


def test_unknown_type_error_lists_valid_types():
    with pytest.raises(TrackSpecError, match="'straight', 'arc', 'clothoid'"):
        Track.from_spec(_spec_with({"type": "spiral"}))


def test_self_crossing_spec_is_rejected():
    loop = {
        "name": "loop",
        "segments": [
            {"type": "straight", "length": 20},
            {"type": "arc", "radius": 20, "angle": 360},
            {"type": "straight", "length": 20},
        ],
    }
    with pytest.raises(TrackSpecError) as info:
        Track.from_spec(loop, source="loop.json")
    message = str(info.value)
    assert message.startswith("segments[1]: the road crosses or touches itself (comes within")
    assert "of segments[" in message and "(in loop.json)" in message
    # clearance=0 skips the check; self_intersects reports the spec segment.
    track = Track.from_spec(loop, clearance=0.0)
    assert track.self_intersects(2.0 * track.lane_width) == 1
    # A hairpin whose branches are 10 m apart touches itself with the default clearance
    # (2 x 7.4 m), but not with a narrow 4 m clearance.
    assert _hairpin().self_intersects(7.4) is not None
    assert _hairpin().self_intersects(4.0) is None


def test_shipped_specs_load():
    s_bend = Track.from_json(TRACKS_DIR / "s-bend.json")
    assert json.loads((TRACKS_DIR / "s-bend.json").read_text()) == S_BEND_SPEC
    assert s_bend.name == "s-bend"
    assert s_bend.lane_width == 3.7
    assert s_bend.length == pytest.approx(40 + 30 * math.pi / 2 + 25 * 2 * math.pi / 3 + 30)
    assert s_bend.self_intersects(2.0 * s_bend.lane_width) is None

    tight = Track.from_json(TRACKS_DIR / "tight-25m.json")
    assert tight.curvature.max() == pytest.approx(1 / 25)
    assert tight.curvature.min() == pytest.approx(-1 / 25)
    assert tight.self_intersects(2.0 * tight.lane_width) is None


def test_from_json_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Track.from_json(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"segments": [')
    with pytest.raises(TrackSpecError, match="broken.json"):
        Track.from_json(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_spec_with({"type": "arc", "radius": -5, "angle": 90})))
    with pytest.raises(TrackSpecError, match=r"segments\[1\]\.radius: must be > 0, got -5 \(in .*bad\.json\)"):
        Track.from_json(bad)


def test_spec_start_pose_and_round_trip():
    spec = dict(S_BEND_SPEC, start={"x": 5.0, "y": -3.0, "heading_deg": 45.0}, comment="ignored")
    track = Track.from_spec(spec)
    assert track.pose(0.0) == pytest.approx((5.0, -3.0, math.radians(45.0)))
    again = Track.from_spec(json.loads(json.dumps(track.to_spec())))
    assert again.name == track.name
    assert again.segment_of_input == track.segment_of_input
    assert again.length == pytest.approx(track.length, abs=1e-9)
    assert np.allclose(again.x, track.x, atol=1e-9) and np.allclose(again.y, track.y, atol=1e-9)


def test_spec_segment_at():
    track = Track.from_spec(S_BEND_SPEC, transition_length=10.0)
    assert track.spec_segment_at(0.0) == 0
    assert track.spec_segment_at(39.0) == 0  # first half of the transition
    assert track.spec_segment_at(41.0) == 1  # second half
    assert list(track.spec_segment_at(np.array([0.0, track.length]))) == [0, 3]


# --------------------------------------------------------------------------- generator and splits
def test_split_seed_ranges_are_disjoint():
    ranges = sorted(SPLIT_SEED_RANGES.values())
    for (_, hi), (lo, _) in zip(ranges[:-1], ranges[1:]):
        assert hi <= lo
    seeds = {split: {split_seed(split, i) for i in (0, 1, 99_999)} for split in (TRAIN, VAL, TEST)}
    assert not seeds[TRAIN] & seeds[VAL] and not seeds[VAL] & seeds[TEST] and not seeds[TRAIN] & seeds[TEST]
    assert split_seed(VAL, 0) == SPLIT_SEED_RANGES[VAL][0]
    with pytest.raises(ValueError, match="unknown split"):
        split_seed("holdout", 0)
    with pytest.raises(ValueError, match="index"):
        split_seed(TRAIN, 100_000)
    with pytest.raises(ValueError, match="index"):
        split_seed(TRAIN, -1)


def test_generate_track_is_deterministic():
    a, b = generate_track(123), generate_track(123)
    assert a.name == "proc-123"
    assert a.to_spec() == b.to_spec()
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert generate_track(124).to_spec() != a.to_spec()


@pytest.mark.parametrize("seed", [split_seed(TRAIN, 0), split_seed(TRAIN, 1), split_seed(VAL, 3), split_seed(TEST, 5), 42])
def test_generated_tracks_are_valid(seed):
    min_radius = 25.0
    track = generate_track(seed, length=400.0, min_radius=min_radius, max_radius=120.0)
    assert track.length >= 400.0
    assert np.max(np.abs(track.curvature)) <= 1.0 / min_radius + 1e-12
    assert track.self_intersects(2.0 * track.lane_width) is None
    first, last = track.input_segments[0], track.input_segments[-1]
    assert first.kind == "straight" and 20.0 <= first.length <= 30.0
    assert last.kind == "straight" and last.length >= 30.0
    arcs = [seg for seg in track.input_segments if seg.kind == "arc"]
    assert arcs
    if len(arcs) >= 2:
        assert any(seg.k_start > 0 for seg in arcs) and any(seg.k_start < 0 for seg in arcs)


def test_generated_tracks_mix_left_and_right_turns():
    turns = np.concatenate(
        [[seg.k_start for seg in generate_track(seed).input_segments if seg.kind == "arc"] for seed in range(20)]
    )
    left_fraction = np.mean(turns > 0)
    assert 0.3 < left_fraction < 0.7


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"min_radius": 130.0, "max_radius": 120.0}, "min_radius"),
        ({"min_radius": 0.0}, "min_radius"),
        ({"length": -1.0}, "length"),
        ({"lane_width": 0.0}, "lane_width"),
        ({"angle_range_deg": (20.0, 200.0)}, "angle_range_deg"),
        ({"straight_range": (30.0, 10.0)}, "straight_range"),
    ],
)
def test_generate_track_validates_parameters(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        generate_track(0, **kwargs)


def test_generate_track_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        generate_track(-1)
    with pytest.raises(ValueError, match="seed"):
        generate_track(1.5)
