"""The policy regression gate (evaluation.regress, ``steerloop regress``) and the pytest plugin:
comparison logic on synthetic results, tolerance files, statistical mode, exit codes end to
end on the smoke suite at a tiny resolution, and a user's test file run through pytester."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from steerloop.evaluation.cli import main
from steerloop.evaluation.stats import bootstrap_ci
from steerloop.evaluation.regress import (CONFIDENCE, GATE_METRICS, IncomparableError, PolicyEvaluator, Tolerance, Tolerances,
                                ToleranceError, assert_no_regression, check_comparable, compare, load_results,
                                load_tolerances, parse_tolerances, policy_fingerprint, suite_from_dict)
from steerloop.evaluation.runner import RESULTS_SCHEMA_VERSION, aggregate
from steerloop.evaluation.suites import Scenario, Suite, load_suite
from steerloop.sim.wrappers import Perturbation

from helpers import SHORT_SPEC

pytest_plugins = ["pytester"]

TINY = "16x32"
SMOKE = [s.name for s in load_suite("smoke").scenarios]


# ----------------------------------------------------------------------------- synthetic results
def scenario(success: bool = True, offset: float = 0.1, **overrides) -> dict:
    """Per-scenario metrics as the runner writes them."""
    metrics = {"success": success, "mean_abs_offset_m": offset, "max_abs_offset_m": 3 * offset,
               "rms_heading_error_rad": 0.02, "departures_per_km": 0.0 if success else 5.0,
               "time_outside_lane_s": 0.0 if success else 0.5, "route_completion": 1.0 if success else 0.4,
               "on_policy_rmse": 0.05, "smoothness_per_s": 0.1, "departures": 0 if success else 1,
               "distance_to_first_departure_m": None if success else 60.0}
    metrics.update(overrides)
    return metrics


def make_results(metrics: list[dict], policy: str = "candidate", suite: str = "syn", seeds=None) -> dict:
    """A results dict shaped like results.json, with aggregates computed by the runner's aggregate()."""
    seeds = list(range(len(metrics))) if seeds is None else seeds
    scenarios = tuple(Scenario(name=f"{suite}-{i:02d}", track=100 + i, seed=seeds[i]) for i in range(len(metrics)))
    return {"schema_version": RESULTS_SCHEMA_VERSION, "policy": {"name": policy}, "suite": suite, "seeds": seeds,
            "resolution": [16, 32],
            "scenarios": [{"name": s.name, "track": s.track, "condition": s.condition, "seed": s.seed, "metrics": m}
                          for s, m in zip(scenarios, metrics)],
            "aggregate": aggregate(metrics, Suite(suite, scenarios))}


def row(comparison, metric: str):
    return next(m for m in comparison.metrics if m.metric == metric)


def test_identical_results_are_exactly_no_change():
    base = make_results([scenario(offset=0.1), scenario(offset=0.2), scenario(False, offset=0.5)], "v1")
    comparison = compare(base, json.loads(json.dumps(base)))
    assert comparison.identical and not comparison.regression and comparison.exit_code == 0
    assert {m.status for m in comparison.metrics} == {"same"}
    assert all(m.delta == 0.0 for m in comparison.metrics)
    assert comparison.newly_failing == () and comparison.newly_passing == ()
    assert "NO REGRESSION (identical" in comparison.table()


def test_absolute_and_relative_tolerances_hand_computed():
    base = make_results([scenario(offset=0.2), scenario(offset=0.2)], "v1")
    # mean |offset| may worsen by max(0.005 m, 10% x 0.2 m) = 0.02 m
    within = compare(make_results([scenario(offset=0.215), scenario(offset=0.215)]), base)
    m = row(within, "mean_abs_offset_m")
    assert m.delta == pytest.approx(0.015) and m.allowed == pytest.approx(0.02)
    assert m.status == "within tolerance" and not within.regression
    at_limit = compare(make_results([scenario(offset=0.22), scenario(offset=0.22)]), base)
    assert row(at_limit, "mean_abs_offset_m").status == "within tolerance"  # exactly at the tolerance passes
    beyond = compare(make_results([scenario(offset=0.225), scenario(offset=0.225)]), base)
    m = row(beyond, "mean_abs_offset_m")
    assert m.delta == pytest.approx(0.025) and m.status == "REGRESSION"
    assert beyond.regression and beyond.exit_code == 1
    # max |offset| = 3 x offset: 0.675 vs 0.6 may worsen by max(0.02, 0.06) = 0.06 -> also a regression
    assert row(beyond, "max_abs_offset_m").allowed == pytest.approx(0.06)
    assert row(beyond, "max_abs_offset_m").status == "REGRESSION"
    # a small baseline: the absolute floor (0.005 m) applies, not 10% of 0.01 m
    small = compare(make_results([scenario(offset=0.014)]), make_results([scenario(offset=0.01)]))
    assert row(small, "mean_abs_offset_m").allowed == pytest.approx(0.005)
    assert row(small, "mean_abs_offset_m").status == "within tolerance"


def test_direction_higher_is_better():
    higher = {m.name for m in GATE_METRICS if m.higher_is_better}
    assert higher == {"success_rate", "route_completion", "recovery_rate", "autonomy_pct"}
    base = make_results([scenario(offset=0.3), scenario(offset=0.3)], "v1")
    better = compare(make_results([scenario(offset=0.1), scenario(offset=0.1)]), base)
    assert row(better, "mean_abs_offset_m").status == "better" and not better.regression
    base = make_results([scenario(), scenario(False)], "v1")
    improved = compare(make_results([scenario(), scenario()]), base)
    assert row(improved, "success_rate").delta == pytest.approx(0.5)
    assert row(improved, "success_rate").status == "better"
    assert improved.newly_passing == ("syn-01",) and not improved.regression


def test_success_rate_may_not_drop_by_default_and_failing_scenarios_are_named():
    base = make_results([scenario(), scenario(), scenario(), scenario()], "v1")
    cand = make_results([scenario(), scenario(False), scenario(), scenario(False)], "v2")
    comparison = compare(cand, base)
    assert row(comparison, "success_rate").delta == pytest.approx(-0.5)
    assert row(comparison, "success_rate").status == "REGRESSION"
    assert comparison.newly_failing == ("syn-01", "syn-03")
    table = comparison.table()
    assert "scenarios that passed before and fail now (2):" in table
    assert "syn-01  (1 departure(s), first at 60.0 m; route completion 40%" in table
    assert "candidate v2 vs baseline v1 on syn (4 scenarios; deterministic)" in table
    assert table.splitlines()[-1].startswith("verdict: REGRESSION")


def test_a_swap_of_outcomes_is_a_regression_unless_allowed():
    base = make_results([scenario(), scenario(False)], "v1")
    cand = make_results([scenario(False), scenario()], "v2")
    comparison = compare(cand, base)
    assert row(comparison, "success_rate").status == "same"  # 50% before and after
    assert comparison.newly_failing == ("syn-00",) and comparison.newly_passing == ("syn-01",)
    assert comparison.too_many_newly_failing and comparison.regression
    assert "1 scenario(s) passed before and fail now (allowed: 0)" in comparison.verdict()
    allowed = compare(cand, base, {"newly_failing_scenarios": {"abs": 1}})
    assert not allowed.regression and allowed.newly_failing == ("syn-00",)
    as_fraction = compare(cand, base, {"newly_failing_scenarios": {"rel": 0.5}})  # 0.5 x 2 scenarios = 1
    assert as_fraction.newly_failing_allowed == pytest.approx(1.0) and not as_fraction.regression


def test_a_metric_absent_from_the_suite_is_not_compared():
    comparison = compare(make_results([scenario()]), make_results([scenario()]))
    names = [m.metric for m in comparison.metrics]
    assert "recovery_rate" not in names and "autonomy_pct" not in names
    assert names[:3] == ["success_rate", "route_completion", "mean_abs_offset_m"]


def with_aggregate(results: dict, metric: str, value) -> dict:
    """A copy of ``results`` whose aggregate ``metric`` is ``value`` (MISSING: the key removed)."""
    results = json.loads(json.dumps(results))
    if value is MISSING:
        del results["aggregate"][metric]
    else:
        results["aggregate"][metric] = value
    return results


MISSING = object()


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan"), (None, "null"), (MISSING, "missing"),
                                          (float("inf"), "inf"), ("0.05", "'0.05'")])
@pytest.mark.parametrize("side", ["candidate", "baseline"])
def test_a_missing_or_non_finite_aggregate_cannot_be_compared(value, shown, side):
    """Fails open on the old gate: a NaN/null/missing aggregate was "n/a" (or skipped), and the
    rest being equal the verdict was "identical", exit 0."""
    base = make_results([scenario(), scenario(offset=0.2)], "v1")
    broken = with_aggregate(base, "on_policy_rmse", value)
    candidate, baseline = (broken, base) if side == "candidate" else (base, broken)
    other = "baseline" if side == "candidate" else "candidate"
    with pytest.raises(IncomparableError, match="missing or non-finite aggregates: on_policy_rmse") as error:
        compare(candidate, baseline)
    message = str(error.value)
    assert f"{side} {shown}" in message and f"{other} 0.05" in message and "\n" not in message
    with pytest.raises(IncomparableError, match="on_policy_rmse"):  # the pytest-plugin path: not a pass
        assert_no_regression(candidate, baseline)
    with pytest.raises(IncomparableError, match="on_policy_rmse"):
        compare(candidate, baseline, statistical=True)


def test_every_broken_aggregate_is_named():
    base = make_results([scenario(), scenario(offset=0.2)], "v1")
    broken = with_aggregate(with_aggregate(base, "success_rate", float("nan")), "mean_abs_offset_m", None)
    with pytest.raises(IncomparableError) as error:
        compare(broken, base)
    assert "success_rate (candidate nan, baseline 1.0)" in str(error.value)
    assert "mean_abs_offset_m (candidate null, baseline 0.15" in str(error.value)


def test_a_metric_both_sides_lack_by_design_is_na_and_the_rest_is_compared():
    base = make_results([scenario(on_policy_rmse=None), scenario(on_policy_rmse=None)], "v1")
    assert base["aggregate"]["on_policy_rmse"] is None  # e.g. every step overridden: nothing to measure
    same = compare(json.loads(json.dumps(base)), base)
    m = row(same, "on_policy_rmse")
    assert m.status == "n/a" and m.baseline is None and m.candidate is None
    assert same.identical and same.exit_code == 0
    worse = compare(make_results([scenario(on_policy_rmse=None, offset=0.3)] * 2), base)
    assert row(worse, "on_policy_rmse").status == "n/a"
    assert row(worse, "mean_abs_offset_m").status == "REGRESSION" and worse.exit_code == 1
    absent = with_aggregate(with_aggregate(base, "on_policy_rmse", MISSING), "success_rate", 1.0)
    both_absent = compare(absent, with_aggregate(base, "on_policy_rmse", MISSING))
    assert "on_policy_rmse" not in [m.metric for m in both_absent.metrics] and both_absent.identical


# ----------------------------------------------------------------------------- statistical mode
def offsets(values) -> list[dict]:
    return [scenario(offset=v, max_abs_offset_m=0.3) for v in values]


def test_statistical_noise_is_not_significant_where_the_deterministic_gate_fails():
    base = make_results(offsets([0.1] * 10), "v1")
    noisy = make_results(offsets([0.2, 0.04] * 5), "v2")  # per-scenario differences +0.1, -0.06: mean +0.02
    deterministic = row(compare(noisy, base), "mean_abs_offset_m")
    assert deterministic.delta == pytest.approx(0.02) and deterministic.allowed == pytest.approx(0.01)
    assert deterministic.status == "REGRESSION"
    comparison = compare(noisy, base, statistical=True)
    m = row(comparison, "mean_abs_offset_m")
    _, lo, hi = bootstrap_ci([0.1, -0.06] * 5, resamples=2000, level=CONFIDENCE, seed=0)
    assert m.ci95 == (pytest.approx(lo), pytest.approx(hi)) and m.pairs == 10
    assert lo < 0 < hi
    assert m.status == "not significant" and not comparison.regression
    assert "95% CI of delta" in comparison.table()
    again = compare(noisy, base, statistical=True)
    assert row(again, "mean_abs_offset_m").ci95 == m.ci95  # seeded: deterministic


def test_statistical_consistent_degradation_fails_only_beyond_tolerance():
    base = make_results(offsets([0.1] * 10), "v1")
    worse = compare(make_results(offsets([0.15] * 10)), base, statistical=True)
    m = row(worse, "mean_abs_offset_m")
    assert m.ci95 == (pytest.approx(0.05), pytest.approx(0.05))
    assert m.status == "REGRESSION" and worse.regression
    assert "significantly worse beyond tolerance (mean_abs_offset_m)" in worse.verdict()
    slightly = compare(make_results(offsets([0.105] * 10)), base, statistical=True)
    assert row(slightly, "mean_abs_offset_m").status == "within tolerance"  # significant, but 0.005 <= 0.01
    assert not slightly.regression


def test_statistical_one_flipped_scenario_in_twenty_is_listed_but_not_significant():
    base = make_results([scenario()] * 20, "v1")
    cand = make_results([scenario(False)] + [scenario()] * 19, "v2")
    comparison = compare(cand, base, statistical=True)
    m = row(comparison, "success_rate")
    assert m.delta == pytest.approx(-0.05)
    assert m.ci95[1] == 0.0 and m.status == "not significant"
    assert comparison.newly_failing == ("syn-00",) and not comparison.regression
    assert compare(cand, base).regression  # the deterministic gate fails on the same flip
    all_fail = compare(make_results([scenario(False)] * 20), base, statistical=True)
    assert row(all_fail, "success_rate").ci95 == (-1.0, -1.0) and all_fail.regression


def test_statistical_identical_is_same():
    base = make_results(offsets([0.1, 0.2, 0.3]), "v1")
    comparison = compare(base, base, statistical=True)
    assert comparison.identical and {m.status for m in comparison.metrics} == {"same"}


# ----------------------------------------------------------------------------- comparability
def test_incomparable_results_name_the_reason():
    base = make_results([scenario(), scenario()], "v1")
    cases = {
        "different suites": make_results([scenario(), scenario()], suite="other"),
        "different seeds": make_results([scenario(), scenario()], seeds=[0, 7]),
        "different scenario names: candidate has 3, baseline has 2": make_results([scenario()] * 3),
    }
    schema = make_results([scenario(), scenario()])
    schema["schema_version"] = "2.0.0"
    cases["different results schema versions: candidate 2.0.0"] = schema
    resolution = make_results([scenario(), scenario()])
    resolution["resolution"] = [66, 200]
    cases["different camera resolutions"] = resolution
    track = make_results([scenario(), scenario()])
    track["scenarios"][1]["track"] = 999
    cases["different scenarios (name, track, condition, seed) differ at scenario 1"] = track
    for reason, candidate in cases.items():
        with pytest.raises(IncomparableError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            check_comparable(load_results(candidate), load_results(base))


def test_not_a_results_file(tmp_path):
    (tmp_path / "other.json").write_text('{"name": "a suite"}')
    with pytest.raises(IncomparableError, match="missing 'schema_version'"):
        load_results(tmp_path / "other.json")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    with pytest.raises(IncomparableError, match="unfinished results directory"):
        load_results(unfinished)


# ----------------------------------------------------------------------------- tolerances
def test_a_tolerance_entry_replaces_the_metric_default():
    tolerances = parse_tolerances({"mean_abs_offset_m": {"abs": 0.01}, "success_rate": {"rel": 0.05}})
    assert tolerances.for_metric("mean_abs_offset_m") == Tolerance(0.01, 0.0)
    assert tolerances.for_metric("success_rate") == Tolerance(0.0, 0.05)
    assert tolerances.for_metric("on_policy_rmse") == Tolerances().for_metric("on_policy_rmse")
    assert Tolerance(0.01, 0.1).allowed(0.5) == pytest.approx(0.05)
    assert Tolerance(0.01, 0.1).allowed(-0.05) == pytest.approx(0.01)


@pytest.mark.parametrize("spec, message", [
    ({"success_rat": {"abs": 0.1}}, "unknown metric 'success_rat'; known metrics: autonomy_pct"),
    ({"success_rate": {"relative": 0.1}}, "success_rate.relative is not a tolerance field; use 'abs'"),
    ({"success_rate": {"abs": -0.1}}, r"success_rate.abs must be a finite number >= 0, got -0.1"),
    ({"success_rate": {"rel": True}}, "success_rate.rel must be a finite number >= 0, got True"),
    ({"success_rate": {"rel": "5%"}}, "success_rate.rel must be a finite number >= 0, got '5%'"),
    ({"success_rate": 0.05}, "success_rate must be a table like"),
    ({"success_rate": {}}, "success_rate is empty"),
    ([0.1], "must be a table of metric"),
])
def test_bad_tolerances_name_the_field(spec, message):
    with pytest.raises(ToleranceError, match=message) as error:
        parse_tolerances(spec, "tol.json")
    assert str(error.value).startswith("tol.json: ")


def test_tolerance_files_json_and_toml(tmp_path):
    (tmp_path / "t.toml").write_text('[mean_abs_offset_m]\nabs = 0.01\n\n[success_rate]\nrel = 0.05\n')
    (tmp_path / "t.json").write_text('{"mean_abs_offset_m": {"abs": 0.01}, "success_rate": {"rel": 0.05}}')
    assert load_tolerances(tmp_path / "t.toml") == load_tolerances(tmp_path / "t.json")
    (tmp_path / "broken.json").write_text('{"mean_abs_offset_m": ')
    with pytest.raises(ToleranceError, match=r"broken.json: not valid JSON"):
        load_tolerances(tmp_path / "broken.json")
    (tmp_path / "broken.toml").write_text('[mean_abs_offset_m\n')
    with pytest.raises(ToleranceError, match=r"broken.toml: not valid TOML"):
        load_tolerances(tmp_path / "broken.toml")
    (tmp_path / "t.yaml").write_text("x: 1")
    with pytest.raises(ToleranceError, match=r"must end in .json or .toml"):
        load_tolerances(tmp_path / "t.yaml")
    with pytest.raises(ToleranceError, match=r"missing.json does not exist"):
        load_tolerances(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- Python API
def test_evaluation_result_attributes():
    result = load_results(make_results([scenario(), scenario(False, offset=0.4)], "v2"))
    assert result.success_rate == 0.5
    assert result.mean_abs_offset_m == pytest.approx(0.25)
    assert result.policy == "v2" and result.suite == "syn"
    assert [s.name for s in result.scenarios] == ["syn-00", "syn-01"]
    assert result.scenarios[1].success is False and result.scenarios[1].mean_abs_offset_m == 0.4
    assert result.failed_scenarios == ("syn-01",)
    with pytest.raises(AttributeError, match="no aggregate 'autonomy_pct'"):
        result.autonomy_pct


def test_assert_no_regression():
    base = make_results([scenario(), scenario()], "v1")
    assert assert_no_regression(base, base).identical
    worse = make_results([scenario(), scenario(False)], "v2")
    with pytest.raises(AssertionError) as error:
        assert_no_regression(worse, base)
    assert "candidate v2 vs baseline v1" in str(error.value) and "syn-01" in str(error.value)
    loose = {"success_rate": {"abs": 0.5}, "newly_failing_scenarios": {"abs": 1}, "route_completion": {"abs": 0.3},
             "departures_per_km": {"abs": 2.5}, "time_outside_lane_s": {"abs": 0.25}}
    assert not assert_no_regression(worse, base, loose).regression


def test_policy_fingerprint_follows_the_content(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights-1")
    (checkpoint / "config.json").write_text("{}")
    first = policy_fingerprint(str(checkpoint))
    evaluator = PolicyEvaluator(tmp_path / "cache")
    suite = load_suite("smoke")
    directory = evaluator.run_dir(str(checkpoint), suite)
    assert policy_fingerprint(str(checkpoint)) == first
    (checkpoint / "model.safetensors").write_bytes(b"weights-2")  # retrained in place
    assert policy_fingerprint(str(checkpoint)) != first
    assert evaluator.run_dir(str(checkpoint), suite) != directory
    assert evaluator.run_dir("expert", suite) != evaluator.run_dir("expert", suite, (16, 32))
    assert policy_fingerprint("expert") == "expert"


def test_policy_evaluator_memoises_and_reuses_the_cache(tmp_path):
    (tmp_path / "short.json").write_text(json.dumps(SHORT_SPEC))
    (tmp_path / "tiny.json").write_text(json.dumps({"name": "tiny", "tracks": ["short.json"]}))
    evaluator = PolicyEvaluator(tmp_path / "cache")
    result = evaluator("expert", tmp_path / "tiny.json", resolution=(16, 32))
    assert evaluator("expert", str(tmp_path / "tiny.json"), resolution=(16, 32)) is result
    assert result.success_rate == 1.0 and result.path.parent.parent == tmp_path / "cache"
    trajectory = next((result.path.parent / "trajectories").iterdir())
    stamp = trajectory.stat().st_mtime_ns
    again = PolicyEvaluator(tmp_path / "cache")("expert", tmp_path / "tiny.json", resolution=(16, 32))
    assert again.data == result.data and trajectory.stat().st_mtime_ns == stamp  # not driven again


def test_a_suite_round_trips_through_its_run_json_form():
    schedule = (Perturbation.push(20), Perturbation("steering_pulse", 150, -0.3, 5))
    suite = Suite("mine", (Scenario(name="mine-00-short-dusk", track=SHORT_SPEC, condition="dusk", seed=3,
                                    perturbations=schedule),
                           Scenario(name="mine-01-proc-7", track=7, interventions=True, seed=4)))
    assert suite_from_dict(json.loads(json.dumps(suite.to_dict()))) == suite


# ----------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Results root shared by the command tests: each policy is evaluated on smoke once."""
    return tmp_path_factory.mktemp("regress")


def regress(capsys, cache: Path, *args: str) -> tuple[int, str, str]:
    code = main(["regress", *args, "--out", str(cache), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def results_dir(cache: Path, policy: str) -> Path:
    (directory,) = cache.glob(f"{policy}-smoke-*")
    return directory


def test_a_policy_against_itself_is_exactly_no_change(capsys, cache):
    code, out, err = regress(capsys, cache, "--policy", "expert", "--baseline", "expert", "--suite", "smoke",
                             "--resolution", TINY)
    assert code == 0, err
    assert "NO REGRESSION (identical: no metric and no scenario outcome changed)" in out
    report = json.loads((cache / "regress.json").read_text())
    assert report["identical"] and not report["regression"]
    assert {m["delta"] for m in report["metrics"]} == {0.0}
    assert {m["status"] for m in report["metrics"]} == {"same"}
    assert report["newly_failing"] == [] and report["newly_passing"] == []


def test_zeros_against_the_expert_is_a_regression_naming_the_scenarios(capsys, cache):
    code, out, err = regress(capsys, cache, "--policy", "zeros", "--baseline", "expert", "--suite", "smoke",
                             "--resolution", TINY)
    assert code == 1, err
    section = out.split("scenarios that passed before and fail now (3):")[1].split("scenarios that failed")[0]
    assert [line.split()[0] for line in section.strip().splitlines()] == SMOKE
    assert "success_rate" in out and "verdict: REGRESSION" in out
    report = json.loads((cache / "regress.json").read_text())
    assert report["newly_failing"] == SMOKE
    success = next(m for m in report["metrics"] if m["metric"] == "success_rate")
    assert success["baseline"] == 1.0 and success["candidate"] == 0.0 and success["status"] == "REGRESSION"


def test_a_results_directory_as_baseline_sets_suite_and_resolution(capsys, cache):
    expert = results_dir(cache, "expert")
    code, out, err = regress(capsys, cache, "--policy", "zeros", "--baseline", str(expert), "--statistical")
    assert code == 1, err
    assert "candidate zeros vs baseline expert on smoke (3 scenarios; statistical" in out
    assert len(list(cache.glob("zeros-smoke-*"))) == 1  # the same 16x32 run was reused, not a new one
    code, out, err = regress(capsys, cache, "--policy", str(results_dir(cache, "expert") / "results.json"),
                             "--baseline", str(expert))
    assert code == 0 and "identical" in out


def test_different_suites_cannot_be_compared(capsys, cache, tmp_path):
    (tmp_path / "short.json").write_text(json.dumps(SHORT_SPEC))
    suite = tmp_path / "tiny.json"
    suite.write_text(json.dumps({"name": "tiny", "tracks": ["short.json"]}))
    code, out, err = regress(capsys, tmp_path / "runs", "--policy", "expert", "--baseline", "expert", "--suite",
                             str(suite), "--resolution", TINY)
    assert code == 0, err
    (tiny,) = (tmp_path / "runs").glob("expert-tiny-*")
    code, out, err = regress(capsys, cache, "--policy", str(tiny), "--baseline", str(results_dir(cache, "expert")))
    assert code == 2
    assert "cannot compare: different suites: candidate 'tiny', baseline 'smoke'" in err
    assert "Traceback" not in err and "verdict" not in out
    code, out, err = regress(capsys, cache, "--policy", "zeros", "--baseline", str(tiny), "--suite", "smoke")
    assert code == 2 and "different suites: the baseline results are on 'tiny', --suite is 'smoke'" in err


def test_different_seeds_cannot_be_compared(capsys, cache, tmp_path):
    changed = tmp_path / "reseeded"
    shutil.copytree(results_dir(cache, "expert"), changed)
    data = json.loads((changed / "results.json").read_text())
    data["seeds"][1] += 1
    (changed / "results.json").write_text(json.dumps(data))
    code, _, err = regress(capsys, cache, "--policy", str(changed), "--baseline", str(results_dir(cache, "expert")))
    assert code == 2 and "different seeds differ at scenario 1" in err


def write_results(directory: Path, results: dict) -> Path:
    """A results directory as `steerloop evaluate` leaves it: results.json and the suite in run.json."""
    directory.mkdir(parents=True)
    scenarios = tuple(Scenario(name=s["name"], track=s["track"], seed=s["seed"]) for s in results["scenarios"])
    (directory / "run.json").write_text(json.dumps({"suite": Suite(results["suite"], scenarios).to_dict()}))
    (directory / "results.json").write_text(json.dumps(results))  # NaN is written as the JSON literal NaN
    return directory


@pytest.mark.parametrize("value", [float("nan"), None, MISSING])
def test_the_command_cannot_compare_a_broken_aggregate(capsys, tmp_path, value):
    base = make_results([scenario(), scenario(offset=0.2)], "v1")
    baseline = write_results(tmp_path / "base", base)
    candidate = write_results(tmp_path / "cand", with_aggregate(base, "mean_abs_offset_m", value))
    code, out, err = regress(capsys, tmp_path / "runs", "--policy", str(candidate), "--baseline", str(baseline))
    assert code == 2, out
    (line,) = err.strip().splitlines()
    assert line.startswith("steerloop regress: cannot compare: missing or non-finite aggregates: mean_abs_offset_m")
    assert "verdict" not in out and "identical" not in out and not (tmp_path / "runs" / "regress.json").exists()


def test_the_command_compares_the_rest_when_both_sides_lack_a_metric(capsys, tmp_path):
    base = make_results([scenario(on_policy_rmse=None)] * 2, "v1")
    baseline = write_results(tmp_path / "base", base)
    code, out, err = regress(capsys, tmp_path / "runs", "--policy", str(baseline), "--baseline", str(baseline))
    assert code == 0, err
    assert "identical" in out and any(line.split()[:1] == ["on_policy_rmse"] and "n/a" in line
                                      for line in out.splitlines())
    worse = write_results(tmp_path / "worse", make_results([scenario(on_policy_rmse=None, offset=0.3)] * 2))
    code, out, err = regress(capsys, tmp_path / "runs", "--policy", str(worse), "--baseline", str(baseline))
    assert code == 1, err
    assert "verdict: REGRESSION" in out and "mean_abs_offset_m" in out.split("verdict:")[1]


def test_a_bad_tolerance_file_fails_before_any_work(capsys, tmp_path):
    bad = tmp_path / "tolerances.toml"
    bad.write_text("[mean_abs_offset_m]\nabs = -0.01\n")
    code, out, err = regress(capsys, tmp_path / "runs", "--policy", "zeros", "--baseline", "expert",
                             "--suite", "smoke", "--tolerance", str(bad))
    assert code == 2
    assert f"{bad}: mean_abs_offset_m.abs must be a finite number >= 0, got -0.01" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_a_tolerance_file_can_let_a_degradation_pass(capsys, cache, tmp_path):
    loose = tmp_path / "loose.json"
    loose.write_text(json.dumps({name: {"abs": 100.0} for name in
                                 ["success_rate", "route_completion", "mean_abs_offset_m", "max_abs_offset_m",
                                  "rms_heading_error_rad", "departures_per_km", "time_outside_lane_s",
                                  "on_policy_rmse", "newly_failing_scenarios"]}))
    code, out, err = regress(capsys, cache, "--policy", str(results_dir(cache, "zeros")),
                             "--baseline", str(results_dir(cache, "expert")), "--tolerance", str(loose))
    assert code == 0, err
    assert "within tolerance" in out and "verdict: NO REGRESSION" in out


def test_the_exit_code_reaches_the_shell(cache):
    result = subprocess.run([sys.executable, "-m", "steerloop", "regress", "--policy",
                             str(results_dir(cache, "zeros")), "--baseline", str(results_dir(cache, "expert"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "verdict: REGRESSION" in result.stdout


# ----------------------------------------------------------------------------- pytest plugin
def test_the_plugin_is_registered_through_pytest11():
    (entry,) = [e for e in metadata.entry_points(group="pytest11") if e.name == "steerloop"]
    assert entry.value == "steerloop.evaluation.pytest_plugin"


USER_TEST_FILE = '''
from pathlib import Path

import pytest

from steerloop.evaluation.regress import assert_no_regression

SUITE = Path(__file__).parent / "suite.json"


@pytest.fixture(scope="session")
def baseline(steerloop_evaluate):
    return steerloop_evaluate("expert", SUITE, resolution=(16, 32))


def test_expert_drives(baseline):
    assert baseline.success_rate >= 0.95
    assert baseline.mean_abs_offset_m < 0.2
    assert [s.success for s in baseline.scenarios] == [True]


def test_evaluated_once_per_session(steerloop_evaluate, baseline):
    assert steerloop_evaluate("expert", str(SUITE), resolution=(16, 32)) is baseline


def test_expert_is_no_regression_of_itself(steerloop_evaluate, baseline):
    again = steerloop_evaluate("expert", SUITE, resolution=(16, 32))
    assert assert_no_regression(again, baseline).identical


def test_zeros_is_caught(steerloop_evaluate, baseline):
    zeros = steerloop_evaluate("zeros", SUITE, resolution=(16, 32))
    assert zeros.failed_scenarios == ("tiny-00-short-default",)
    with pytest.raises(AssertionError, match="REGRESSION"):
        assert_no_regression(zeros, baseline)


def test_zeros_fails_with_the_diff_table(steerloop_evaluate, baseline):
    assert_no_regression(steerloop_evaluate("zeros", SUITE, resolution=(16, 32)), baseline)
'''


def test_pytest_plugin_in_a_users_test_file(pytester):
    pytester.makefile(".json", short=json.dumps(SHORT_SPEC),
                      suite=json.dumps({"name": "tiny", "tracks": ["short.json"]}))
    pytester.makepyfile(test_policy=USER_TEST_FILE)
    out = pytester.path / "steerloop-results"
    result = pytester.runpytest_subprocess("--steerloop-out", str(out), "-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*test_zeros_fails_with_the_diff_table*", "*policy regression*",
                                 "*candidate zeros vs baseline expert on tiny (1 scenarios; deterministic)*",
                                 "*success_rate*REGRESSION*", "*scenarios that passed before and fail now (1):*",
                                 "*tiny-00-short-default*", "*verdict: REGRESSION*"])
    assert sorted(p.name.split("-")[0] for p in out.iterdir()) == ["expert", "zeros"]  # one run each
