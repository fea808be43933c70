"""Tests for evaluation.metrics.drift_metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steerloop.evaluation.metrics import departure_events, drift_metrics


def _trajectory(offset, *, progress=None, heading=None, steering=None, expert=None) -> dict:
    n = len(offset)
    return {
        "lateral_offset": np.asarray(offset, float),
        "heading_error": np.zeros(n) if heading is None else np.asarray(heading, float),
        "progress": np.arange(1, n + 1, dtype=float) if progress is None else np.asarray(progress, float),
        "steering": np.zeros(n) if steering is None else np.asarray(steering, float),
        "expert_steering": np.zeros(n) if expert is None else np.asarray(expert, float),
    }


def test_straight_drift():
    # 10 steps of 0.1 s, 1 m per step, offset growing 0.1 m per step up to exactly the threshold.
    offset = 0.1 * np.arange(1, 11)  # 0.1 .. 1.0
    traj = _trajectory(offset, heading=np.full(10, 0.05), steering=np.full(10, 0.1))
    m = drift_metrics(traj, dt=0.1, route_length=20.0, reached_end=False)
    assert m["steps"] == 10
    assert m["duration_s"] == pytest.approx(1.0)
    assert m["distance_m"] == pytest.approx(9.0)  # progress 1 -> 10
    assert m["mean_abs_offset_m"] == pytest.approx(0.55)
    assert m["max_abs_offset_m"] == pytest.approx(1.0)
    assert m["rms_heading_error_rad"] == pytest.approx(0.05)
    assert m["integrated_deviation_m_s"] == pytest.approx(5.5 * 0.1)
    # 1.0 m is not *beyond* the 1.0 m threshold: no departure
    assert m["time_outside_lane_s"] == 0.0
    assert m["departures"] == 0
    assert m["departures_per_km"] == 0.0
    assert m["time_to_first_departure_s"] is None
    assert m["distance_to_first_departure_m"] is None
    assert m["route_completion"] == pytest.approx(10.0 / 20.0)  # stopped at 10 m of 20 m
    assert m["success"] is False  # did not reach the end
    assert m["on_policy_rmse"] == pytest.approx(0.1)
    assert m["smoothness_per_s"] == 0.0


def test_departure_and_return():
    dt = 0.05
    offset = [0.0, 0.5, 1.2, 1.5, 0.8, 0.2, -1.1, -0.3]
    progress = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    m = drift_metrics(_trajectory(offset, progress=progress), dt=dt, route_length=100.0, reached_end=True)
    assert m["departures"] == 2  # out at index 2 (left), back, out again at index 6 (right)
    assert m["time_outside_lane_s"] == pytest.approx(3 * dt)  # indices 2, 3, 6
    assert m["time_to_first_departure_s"] == pytest.approx(3 * dt)  # the 3rd step
    assert m["distance_to_first_departure_m"] == pytest.approx(1.5)
    assert m["route_completion"] == pytest.approx(1.5 / 100.0)  # distance before the first departure
    assert m["distance_m"] == pytest.approx(3.5)
    assert m["departures_per_km"] == pytest.approx(2 / 0.0035)
    assert m["success"] is False  # reached the end, but departed
    assert m["max_abs_offset_m"] == pytest.approx(1.5)
    assert m["mean_abs_offset_m"] == pytest.approx(sum(abs(v) for v in offset) / 8)
    assert m["integrated_deviation_m_s"] == pytest.approx(sum(abs(v) for v in offset) * dt)


def test_departure_threshold_is_configurable():
    offset = [0.0, 0.5, 1.2, 1.5, 0.8, 0.2, -1.1, -0.3]
    m = drift_metrics(_trajectory(offset), dt=0.05, route_length=100.0, reached_end=True, departure_threshold=0.6)
    assert m["departures"] == 2  # 1.2 (through 0.8) and -1.1
    assert m["time_outside_lane_s"] == pytest.approx(4 * 0.05)  # 1.2, 1.5, 0.8, -1.1
    assert m["time_to_first_departure_s"] == pytest.approx(3 * 0.05)


def test_clean_run_to_the_end_is_a_success():
    m = drift_metrics(_trajectory([0.1, -0.2, 0.05], progress=[10.0, 20.0, 30.0]), dt=0.1, route_length=25.0,
                      reached_end=True)
    assert m["success"] is True
    assert m["route_completion"] == 1.0
    assert m["departures"] == 0 and m["departures_per_km"] == 0.0
    assert m["rms_heading_error_rad"] == 0.0


def test_on_policy_rmse_and_smoothness():
    dt = 0.05
    steering = [0.0, 0.1, -0.1, -0.1]
    expert = [0.0, 0.0, 0.1, -0.3]
    m = drift_metrics(_trajectory(np.zeros(4), steering=steering, expert=expert), dt=dt, route_length=10.0,
                      reached_end=False)
    # differences 0, 0.1, -0.2, 0.2 -> sqrt((0.01 + 0.04 + 0.04) / 4) = 0.15
    assert m["on_policy_rmse"] == pytest.approx(0.15)
    # |delta steering| = 0.1, 0.2, 0.0 -> mean 0.1 per step -> 2.0 per second
    assert m["smoothness_per_s"] == pytest.approx(2.0)


def test_heading_rms():
    m = drift_metrics(_trajectory(np.zeros(4), heading=[0.1, -0.1, 0.2, -0.2]), dt=0.05, route_length=10.0,
                      reached_end=False)
    assert m["rms_heading_error_rad"] == pytest.approx(math.sqrt((0.01 + 0.01 + 0.04 + 0.04) / 4))


def test_single_step_and_empty_trajectories():
    m = drift_metrics(_trajectory([0.3], steering=[0.2]), dt=0.05, route_length=10.0, reached_end=False)
    assert m["steps"] == 1 and m["smoothness_per_s"] == 0.0 and m["distance_m"] == 0.0
    assert math.isnan(m["departures_per_km"])
    with pytest.raises(ValueError, match="empty"):
        drift_metrics(_trajectory([]), dt=0.05, route_length=10.0, reached_end=False)


def test_departure_events_are_rising_edges():
    np.testing.assert_array_equal(departure_events(np.array([1.5, 1.5, 0.0, -2.0, 0.0]), 1.0), [0, 3])
    np.testing.assert_array_equal(departure_events(np.array([0.0, 0.9]), 1.0), [])
