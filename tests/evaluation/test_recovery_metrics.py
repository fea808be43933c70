"""Recovery metrics, autonomy and bootstrap intervals on synthetic trajectories with
hand-computed answers (evaluation.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steerloop.evaluation.metrics import (RECOVERY_DEADLINE, RECOVERY_HOLD, RECOVERY_OFFSET, autonomy_percent, bootstrap_ci,
                                recovery_metrics)
from steerloop.sim.wrappers import Perturbation

DT = 0.05  # [s] -> deadline 100 steps, hold 20 steps
N = 200
# Acts on control steps 11..20; trajectory index i is the state after step i + 1, so the
# perturbation spans indices 10..19 (begin = 10) and the policy is in control from index 20.
PUSH = Perturbation("lateral_push", 11, 0.5, 10)
BEGIN, RELEASE = 10, 20


def trajectory(after_release, *, heading_deg=None) -> dict:
    """Offset 0 before the push, a linear ramp to 0.5 m during it, then ``after_release``
    (the offsets from index RELEASE on, padded with its last value)."""
    offset = np.zeros(N)
    offset[BEGIN:RELEASE] = np.linspace(0.05, 0.5, RELEASE - BEGIN)
    tail = np.asarray(after_release, dtype=np.float64)
    offset[RELEASE:RELEASE + len(tail)] = tail
    offset[RELEASE + len(tail):] = tail[-1]
    heading = np.zeros(N) if heading_deg is None else np.radians(np.broadcast_to(heading_deg, (N,)))
    return {"lateral_offset": offset, "heading_error": heading, "progress": np.arange(N) * 0.5,
            "steering": np.zeros(N), "expert_steering": np.zeros(N)}


def test_constants_match_the_design():
    assert (RECOVERY_OFFSET, RECOVERY_DEADLINE, RECOVERY_HOLD) == (0.25, 5.0, 1.0)


def test_exponential_return_recovers_with_hand_computed_time():
    # 0.5 exp(-j / 10): first <= 0.25 m at j = ceil(10 ln 2) = 7 (0.2483 m; j = 6 gives 0.2744 m)
    j = np.arange(N - RELEASE)
    (record,) = recovery_metrics(trajectory(0.5 * np.exp(-j / 10.0)), [PUSH], dt=DT)
    assert record["reached"] is True
    assert record["recovered"] is True
    assert record["recovery_time_s"] == pytest.approx(7 * DT)
    assert record["overshoot_m"] == 0.0  # never crosses the centre line
    assert record["kind"] == "lateral_push" and record["start_step"] == 11 and record["magnitude"] == 0.5


def test_overshoot_and_recovery_time_by_hand():
    # crosses to -0.3 m (outside the 0.25 m band) and settles from j = 5 on
    tail = [0.5, 0.3, 0.1, -0.1, -0.3, -0.2, -0.1, 0.0]
    (record,) = recovery_metrics(trajectory(tail), [PUSH], dt=DT)
    assert record["recovered"] is True
    assert record["recovery_time_s"] == pytest.approx(5 * DT)
    assert record["overshoot_m"] == pytest.approx(0.3)


def test_overshoot_is_measured_against_the_side_of_the_push():
    tail = [-0.5, -0.2, 0.1, 0.15, 0.05, 0.0]  # pushed to the right, overshoots 0.15 m to the left
    (record,) = recovery_metrics(trajectory(tail), [Perturbation("lateral_push", 11, -0.5, 10)], dt=DT)
    assert record["overshoot_m"] == pytest.approx(0.15)
    assert record["recovered"] is True and record["recovery_time_s"] == pytest.approx(1 * DT)


def test_never_returning_is_not_recovered():
    (record,) = recovery_metrics(trajectory([0.5]), [PUSH], dt=DT)
    assert record["reached"] is True
    assert record["recovered"] is False
    assert record["recovery_time_s"] is None
    assert record["overshoot_m"] == 0.0


def test_returning_after_the_deadline_is_not_recovered():
    # back at 0 only 101 steps (5.05 s) after the release: one step too late
    late = int(round(RECOVERY_DEADLINE / DT)) + 1
    (record,) = recovery_metrics(trajectory([0.5] * late + [0.0]), [PUSH], dt=DT)
    assert record["recovered"] is False and record["recovery_time_s"] is None
    # ... while exactly at the deadline it still counts
    (record,) = recovery_metrics(trajectory([0.5] * (late - 1) + [0.0]), [PUSH], dt=DT)
    assert record["recovered"] is True and record["recovery_time_s"] == pytest.approx(RECOVERY_DEADLINE)


def test_departure_during_recovery_is_not_recovered():
    # drifts out beyond the 1 m departure threshold before coming back to the centre
    tail = [0.5, 0.7, 0.9, 1.1, 1.2, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    (record,) = recovery_metrics(trajectory(tail), [PUSH], dt=DT)
    assert record["recovered"] is False
    assert record["recovery_time_s"] is None
    # the same excursion is fine with a wider departure threshold
    (record,) = recovery_metrics(trajectory(tail), [PUSH], dt=DT, departure_threshold=1.5)
    assert record["recovered"] is True and record["recovery_time_s"] == pytest.approx(9 * DT)


def test_leaving_the_band_before_the_hold_ends_delays_recovery():
    # inside at j = 2 for only 10 steps, out again, then inside for good from j = 15
    tail = [0.5, 0.3] + [0.1] * 10 + [0.3] * 3 + [0.0]
    (record,) = recovery_metrics(trajectory(tail), [PUSH], dt=DT)
    assert record["recovered"] is True
    assert record["recovery_time_s"] == pytest.approx(15 * DT)


def test_heading_error_must_be_small_too():
    j = np.arange(N - RELEASE)
    offsets = 0.5 * np.exp(-j / 10.0)
    (record,) = recovery_metrics(trajectory(offsets, heading_deg=5.0), [PUSH], dt=DT)
    assert record["recovered"] is False
    (record,) = recovery_metrics(trajectory(offsets, heading_deg=2.0), [PUSH], dt=DT)
    assert record["recovered"] is True


def test_perturbation_beyond_the_episode_is_not_reached():
    late = Perturbation("heading_kick", N + 5, 5.0, 1)
    records = recovery_metrics(trajectory([0.0]), [PUSH, late], dt=DT)
    assert [r["reached"] for r in records] == [True, False]
    assert records[1]["recovered"] is False and records[1]["overshoot_m"] is None
    assert records[1]["recovery_time_s"] is None


def test_one_record_per_perturbation_in_order():
    kick = Perturbation("heading_kick", 150, 5.0, 1)
    records = recovery_metrics(trajectory([0.0]), [PUSH, kick], dt=DT)
    assert [r["kind"] for r in records] == ["lateral_push", "heading_kick"]
    assert records[1]["recovered"] is True and records[1]["recovery_time_s"] == 0.0


# ----------------------------------------------------------------------------- autonomy
@pytest.mark.parametrize("interventions,elapsed,expected", [
    (2, 120.0, 90.0),  # NVIDIA: (1 - 2 x 6 / 120) x 100
    (0, 30.0, 100.0),
    (1, 600.0, 99.0),
    (5, 60.0, 50.0),
    (30, 120.0, 0.0),  # floored at 0
])
def test_autonomy_percent_hand_values(interventions, elapsed, expected):
    assert autonomy_percent(interventions, elapsed) == pytest.approx(expected)


def test_autonomy_percent_custom_penalty_and_bad_elapsed():
    assert autonomy_percent(1, 100.0, penalty_s=10.0) == pytest.approx(90.0)
    with pytest.raises(ValueError):
        autonomy_percent(1, 0.0)


# ----------------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_is_deterministic_and_contains_the_mean():
    values = list(np.random.default_rng(7).normal(2.0, 1.0, 25))
    first = bootstrap_ci(values)
    assert first == bootstrap_ci(values)
    point, lo, hi = first
    assert point == pytest.approx(float(np.mean(values)))
    assert lo <= point <= hi and lo < hi
    # with a different seed the interval moves a little but stays around the mean
    _, lo2, hi2 = bootstrap_ci(values, seed=1)
    assert lo2 <= point <= hi2


def test_bootstrap_ci_interval_shrinks_with_confidence_level():
    values = list(np.random.default_rng(3).uniform(0, 1, 40))
    _, lo95, hi95 = bootstrap_ci(values)
    _, lo50, hi50 = bootstrap_ci(values, level=0.5)
    assert lo95 <= lo50 <= hi50 <= hi95


def test_bootstrap_ci_edge_cases():
    assert bootstrap_ci([]) == (None, None, None)
    assert bootstrap_ci([None, float("nan")]) == (None, None, None)
    assert bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    point, lo, hi = bootstrap_ci([0.0, None, 1.0, float("inf")])  # None and non-finite values are dropped
    assert point == 0.5 and 0.0 <= lo <= hi <= 1.0
    assert math.isfinite(lo) and math.isfinite(hi)
