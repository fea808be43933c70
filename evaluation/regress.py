"""The policy regression gate (``steerloop regress``) and its Python API.

A candidate policy is compared with a baseline on one scenario suite: per-metric
aggregates against tolerances, and per-scenario outcomes (a scenario that passed before
and fails now is named). Either side is a policy (evaluated here, deterministically) or
an existing ``steerloop evaluate`` results directory / ``results.json``.

- :func:`compare` compares two results (deterministic or, with ``statistical=True``, a
  paired bootstrap over scenarios) and returns a :class:`Comparison` (``.table()``,
  ``.regression``);
- :func:`assert_no_regression` raises ``AssertionError`` with the diff table;
- :class:`PolicyEvaluator` evaluates a policy on a suite into a content-keyed cache
  directory and returns an :class:`EvaluationResult` (attribute access to the
  aggregates); the pytest plugin (``evaluation.pytest_plugin``) is built on it;
- :func:`regress` is the command: it prints the table and returns the exit code
  (0 no regression, 1 regression, 2 could not compare).
"""

from __future__ import annotations

from __future__ import annotations

import json
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path

from steerloop.evaluation.cache import (
    PolicyEvaluator, code_fingerprint, default_cache_dir, policy_fingerprint)
from steerloop.evaluation.results import (
    EvaluationResult, IncomparableError, ScenarioResult, check_comparable, check_results_match_suite, load_results,
    results_path)
from steerloop.evaluation.tolerances import (
    GATE_METRICS, NEWLY_FAILING, GateMetric, Tolerance, ToleranceError, Tolerances, as_tolerances, load_tolerances,
    parse_tolerances)
from steerloop.evaluation.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_ci
from steerloop.evaluation.runner import ResultsError
from steerloop.evaluation.suites import Scenario, Suite, SuiteError, check_scenario_names, load_suite
from steerloop.paths import path_under
from steerloop.sim.wrappers import Perturbation
from steerloop.sim.conditions import ConditionFile

__all__ = [  # the gate's public API, including what it builds on (results, tolerances, the cache)
    "EXIT_OK", "EXIT_REGRESSION", "EXIT_INCOMPARABLE", "GATE_METRICS", "NEWLY_FAILING", "Comparison", "EvaluationResult",
    "GateMetric", "IncomparableError", "MetricComparison", "PolicyEvaluator", "ScenarioResult", "Tolerance",
    "ToleranceError", "Tolerances", "as_tolerances", "assert_no_regression", "check_comparable",
    "check_results_match_suite", "code_fingerprint", "compare", "default_cache_dir", "load_results", "load_tolerances",
    "parse_tolerances", "policy_fingerprint", "regress", "results_path",
]

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_INCOMPARABLE = 2

_FLOAT_SLACK = 1e-9  # relative; keeps "exactly at the tolerance" from failing on rounding


# ----------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class MetricComparison:
    """One row of the diff table. ``delta`` = candidate - baseline; ``allowed`` = how much
    worse the metric may get; ``ci95`` (statistical mode) = paired bootstrap interval of the
    mean per-scenario difference over ``pairs`` scenarios."""

    metric: str
    higher_is_better: bool
    baseline: float | None
    candidate: float | None
    delta: float | None
    allowed: float | None
    status: str  # same | better | within tolerance | not significant | REGRESSION | n/a | not tested
    ci95: tuple[float, float] | None = None
    pairs: int = 0

    @property
    def regression(self) -> bool:
        return self.status == "REGRESSION"


@dataclass(frozen=True)
class Comparison:
    """The outcome of :func:`compare`: one row per metric and the scenarios whose outcome flipped."""

    candidate: str
    baseline: str
    suite: str
    scenarios: int
    statistical: bool
    metrics: tuple[MetricComparison, ...]
    newly_failing: tuple[str, ...]
    newly_passing: tuple[str, ...]
    newly_failing_allowed: float
    failing_details: tuple[str, ...] = ()

    @property
    def regressions(self) -> tuple[MetricComparison, ...]:
        return tuple(m for m in self.metrics if m.regression)

    @property
    def too_many_newly_failing(self) -> bool:
        """Deterministic mode: more scenarios went from pass to fail than allowed. (Statistical
        mode lists them, and the paired test of success_rate decides.)"""
        return not self.statistical and len(self.newly_failing) > self.newly_failing_allowed + _FLOAT_SLACK

    @property
    def regression(self) -> bool:
        return bool(self.regressions) or self.too_many_newly_failing

    @property
    def identical(self) -> bool:
        """Every compared metric and every scenario outcome is exactly the same."""
        return all(m.delta in (0.0, None) for m in self.metrics) and not self.newly_failing \
            and not self.newly_passing

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.regression else EXIT_OK

    def verdict(self) -> str:
        if not self.regression:
            return "NO REGRESSION" + (" (identical: no metric and no scenario outcome changed)"
                                      if self.identical else "")
        reasons = []
        if self.regressions:
            reasons.append(f"{len(self.regressions)} metric(s) {'significantly ' if self.statistical else ''}"
                           f"worse beyond tolerance ({', '.join(m.metric for m in self.regressions)})")
        if self.too_many_newly_failing:
            reasons.append(f"{len(self.newly_failing)} scenario(s) passed before and fail now "
                           f"(allowed: {self.newly_failing_allowed:g})")
        return "REGRESSION: " + "; ".join(reasons)

    def table(self) -> str:
        """The readable diff table (what ``steerloop regress`` prints)."""
        mode = (f"statistical: paired bootstrap {CONFIDENCE:.0%} CI of the per-scenario difference, "
                f"{BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}") if self.statistical else "deterministic"
        lines = [f"candidate {self.candidate} vs baseline {self.baseline} on {self.suite} "
                 f"({self.scenarios} scenarios; {mode})"]
        header = ["metric", "better", "baseline", "candidate", "delta"]
        if self.statistical:
            header.append(f"{CONFIDENCE:.0%} CI of delta")
        header += ["may worsen by", "status"]
        rows = []
        for m in self.metrics:
            row = [m.metric, "higher" if m.higher_is_better else "lower", _fmt(m.baseline), _fmt(m.candidate),
                   _fmt(m.delta, signed=True)]
            if self.statistical:
                row.append(f"[{_fmt(m.ci95[0], signed=True)}, {_fmt(m.ci95[1], signed=True)}]" if m.ci95 else "-")
            row += [_fmt(m.allowed), m.status]
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        numeric = set(range(2, len(header) - 1))

        def render(row):
            cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            return "  " + "  ".join(cells).rstrip()

        lines += [render(header), "  " + "  ".join("-" * w for w in widths)] + [render(r) for r in rows]
        lines.append(f"scenarios that passed before and fail now ({len(self.newly_failing)}):"
                     + ("" if self.newly_failing else " none"))
        lines += [f"  {detail}" for detail in self.failing_details]
        lines.append(f"scenarios that failed before and pass now ({len(self.newly_passing)}):"
                     + ("" if self.newly_passing else " none"))
        lines += [f"  {name}" for name in self.newly_passing]
        lines.append(f"verdict: {self.verdict()}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "baseline": self.baseline, "suite": self.suite,
                "scenarios": self.scenarios, "statistical": self.statistical, "regression": self.regression,
                "identical": self.identical, "verdict": self.verdict(),
                "metrics": [{"metric": m.metric, "higher_is_better": m.higher_is_better, "baseline": m.baseline,
                             "candidate": m.candidate, "delta": m.delta, "allowed": m.allowed, "status": m.status,
                             "ci95": list(m.ci95) if m.ci95 else None, "pairs": m.pairs} for m in self.metrics],
                "newly_failing": list(self.newly_failing), "newly_passing": list(self.newly_passing),
                "newly_failing_allowed": self.newly_failing_allowed}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if signed and value == 0:
        return "0"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _number(value) -> float | None:
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _worsening(metric: GateMetric, delta: float) -> float:
    """How much worse (> 0) or better (< 0) a change of ``delta`` is."""
    return -delta if metric.higher_is_better else delta


def _beyond(worsening: float, allowed: float, baseline: float) -> bool:
    return worsening > allowed + _FLOAT_SLACK * max(1.0, abs(baseline))


_ABSENT = object()  # an aggregate key that is not in results.json at all


def _shown(value) -> str:
    return "missing" if value is _ABSENT else "null" if value is None else repr(value)


def _finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _uncomparable_aggregates(candidate: EvaluationResult, baseline: EvaluationResult) -> list[str]:
    """One text per gate metric that cannot be compared: missing, null, non-finite or not a
    number on either side. A metric both sides lack by design (absent from both, e.g.
    recovery_rate without perturbations, or null on both, e.g. no recovery events) is fine."""
    problems = []
    for metric in GATE_METRICS:
        c = candidate.aggregate.get(metric.name, _ABSENT)
        b = baseline.aggregate.get(metric.name, _ABSENT)
        if (c is b is _ABSENT) or (c is None and b is None) or (_finite_number(c) and _finite_number(b)):
            continue
        problems.append(f"{metric.name} (candidate {_shown(c)}, baseline {_shown(b)})")
    return problems


def _compare_metric(metric: GateMetric, candidate: EvaluationResult, baseline: EvaluationResult,
                    tolerance: Tolerance, statistical: bool) -> MetricComparison | None:
    if metric.name not in baseline.aggregate and metric.name not in candidate.aggregate:
        return None  # the suite does not measure it (e.g. recovery_rate without perturbations)
    b, c = _number(baseline.aggregate.get(metric.name)), _number(candidate.aggregate.get(metric.name))
    if b is None or c is None:  # null on both sides (compare() refuses any other missing value)
        return MetricComparison(metric.name, metric.higher_is_better, b, c, None, None, "n/a")
    delta, allowed = c - b, tolerance.allowed(b)
    worse = _worsening(metric, delta)
    if not statistical:
        status = "same" if delta == 0 else "better" if worse < 0 else \
            "REGRESSION" if _beyond(worse, allowed, b) else "within tolerance"
        return MetricComparison(metric.name, metric.higher_is_better, b, c, delta, allowed, status)
    if metric.per_scenario is None:
        return MetricComparison(metric.name, metric.higher_is_better, b, c, delta, allowed, "not tested")
    diffs = []
    for cs, bs in zip(candidate.data["scenarios"], baseline.data["scenarios"]):
        cv, bv = _number(cs["metrics"].get(metric.per_scenario)), _number(bs["metrics"].get(metric.per_scenario))
        if cv is not None and bv is not None:
            diffs.append(cv - bv)
    if not diffs:
        return MetricComparison(metric.name, metric.higher_is_better, b, c, delta, allowed, "n/a")
    _, lo, hi = bootstrap_ci(diffs, resamples=BOOTSTRAP_RESAMPLES, level=CONFIDENCE, seed=BOOTSTRAP_SEED)
    # The CI must lie entirely on the bad side of zero and beyond the tolerance.
    least_worse = -hi if metric.higher_is_better else lo
    if delta == 0 and lo == hi == 0:
        status = "same"
    elif worse < 0:
        status = "better"
    elif least_worse > 0 and _beyond(least_worse, allowed, b):
        status = "REGRESSION"
    elif least_worse > 0:
        status = "within tolerance"
    else:
        status = "not significant"
    return MetricComparison(metric.name, metric.higher_is_better, b, c, delta, allowed, status, (lo, hi), len(diffs))


def _failure_detail(entry: dict) -> str:
    m = entry["metrics"]
    parts = []
    if m.get("departures"):
        parts.append(f"{m['departures']} departure(s)")
        if m.get("distance_to_first_departure_m") is not None:
            parts[-1] += f", first at {m['distance_to_first_departure_m']:.1f} m"
    if m.get("route_completion") is not None:
        parts.append(f"route completion {m['route_completion']:.0%}")
    if m.get("max_abs_offset_m") is not None:
        parts.append(f"max |offset| {m['max_abs_offset_m']:.2f} m")
    return entry["name"] + (f"  ({'; '.join(parts)})" if parts else "")


def compare(candidate, baseline, tolerances=None, *, statistical: bool = False) -> Comparison:
    """Compare ``candidate`` with ``baseline`` (results dicts, paths or :class:`EvaluationResult`).

    Deterministic mode: a metric regresses when it got worse by more than its tolerance.
    Statistical mode (noisy policies): per-scenario differences are paired and a seeded
    bootstrap gives a 95% interval of their mean; a metric regresses only when the whole
    interval is on the bad side of zero and beyond the tolerance. Raises
    :class:`IncomparableError` when the results are not of the same suite/seeds/schema, or
    when a gate metric's aggregate is missing, null or non-finite on one side (a metric that
    both sides lack by design, absent or null on both, is reported as n/a and the rest compared)."""
    candidate, baseline = load_results(candidate), load_results(baseline)
    check_comparable(candidate, baseline)
    problems = _uncomparable_aggregates(candidate, baseline)
    if problems:
        raise IncomparableError(
            f"missing or non-finite aggregates: {', '.join(problems)}; a gate metric needs a finite value on both "
            "sides (or neither): check that side's results.json and re-evaluate it if it is damaged")
    tolerances = as_tolerances(tolerances)
    rows = tuple(row for metric in GATE_METRICS
                 if (row := _compare_metric(metric, candidate, baseline, tolerances.for_metric(metric.name),
                                            statistical)) is not None)
    pairs = list(zip(candidate.data["scenarios"], baseline.data["scenarios"]))
    failing = [c for c, b in pairs if b["metrics"].get("success") and not c["metrics"].get("success")]
    passing = [c["name"] for c, b in pairs if not b["metrics"].get("success") and c["metrics"].get("success")]
    return Comparison(candidate=candidate.policy, baseline=baseline.policy, suite=candidate.suite,
                      scenarios=len(pairs), statistical=statistical, metrics=rows,
                      newly_failing=tuple(c["name"] for c in failing), newly_passing=tuple(passing),
                      newly_failing_allowed=tolerances.newly_failing.allowed(len(pairs)),
                      failing_details=tuple(_failure_detail(c) for c in failing))


def assert_no_regression(result, baseline, tolerances=None, *, statistical: bool = False) -> Comparison:
    """Raise ``AssertionError`` with the diff table if ``result`` regressed against ``baseline``.

    Both are :class:`EvaluationResult` s, results dicts, ``results.json`` files or results
    directories; ``tolerances`` is None (the defaults), a mapping in the tolerance-file format
    (``{"mean_abs_offset_m": {"abs": 0.01}}``) or a tolerance file path. Returns the
    :class:`Comparison` when there is no regression. Results of different suites, or with
    missing or non-finite aggregates (see :func:`compare`), raise :class:`IncomparableError`."""
    comparison = compare(result, baseline, tolerances, statistical=statistical)
    if comparison.regression:
        raise AssertionError("policy regression\n" + comparison.table())
    return comparison


# ----------------------------------------------------------------------------- the command
def suite_from_dict(spec: dict) -> Suite:
    """A :class:`Suite` from ``Suite.to_dict()`` (as stored in a results directory's run.json)."""
    scenarios = []
    for s in spec["scenarios"]:
        fields = dict(s)
        fields["perturbations"] = tuple(Perturbation(**p) for p in s.get("perturbations", ()))
        scenarios.append(Scenario(**fields))
    source = spec.get("condition_file")  # a suite with a condition file carries its content
    return Suite(spec["name"], tuple(scenarios), ConditionFile.from_dict(source) if source is not None else None)


def _suite_of(results: EvaluationResult) -> Suite | None:
    """The suite ``results`` were evaluated on: from the directory's run.json, else a built-in by name."""
    run_file = results.path.parent / "run.json" if results.path is not None else None
    if run_file is not None and run_file.is_file():
        try:
            suite = suite_from_dict(json.loads(run_file.read_text())["suite"])
        except (json.JSONDecodeError, TypeError, KeyError, ValueError):
            suite = None  # a run.json of another steerloop version: fall back to the suite's name
        if suite is not None:
            check_scenario_names(suite, str(run_file))  # its names name the files evaluation writes
            return suite
    try:
        return load_suite(results.suite)
    except (SuiteError, ValueError):
        return None


def regress(candidate: str, baseline: str, *, suite: str | None = None, tolerance: str | None = None,
            out: str | None = None, workers: int = 1, statistical: bool = False, resolution=None,
            progress: bool = True, plots: bool = False, stdout=None, stderr=None,
            candidate_kwargs: dict | None = None, baseline_kwargs: dict | None = None, no_cache: bool = False) -> int:
    """``steerloop regress``: print the diff table and return 0 (no regression), 1 (regression)
    or 2 (could not compare; the reason goes to ``stderr``). Either side is a policy spec
    (a user's class or factory gets ``candidate_kwargs`` / ``baseline_kwargs``) or results;
    ``no_cache`` evaluates the policies again instead of reusing cached results."""
    from steerloop.agents.checkpoint import CheckpointError

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr

    def fail(message: str) -> int:
        print(f"steerloop regress: {message}", file=stderr)
        return EXIT_INCOMPARABLE

    try:
        tolerances = load_tolerances(tolerance) if tolerance else Tolerances()
        sides = {"candidate": candidate, "baseline": baseline}
        kwargs = {"candidate": candidate_kwargs, "baseline": baseline_kwargs}
        given = {label: load_results(source) for label, source in sides.items() if results_path(source)}
        for label in given:
            if kwargs[label]:
                flag = "--policy-kwargs" if label == "candidate" else "--baseline-kwargs"
                return fail(f"{flag} applies to a policy, but the {label} {sides[label]} is a results location")
        if suite is not None:
            chosen = load_suite(suite)
            for label, results in given.items():
                check_results_match_suite(results, chosen, label)
        elif given:
            label = "baseline" if "baseline" in given else "candidate"
            results = given[label]
            chosen = _suite_of(results)
            if chosen is None:
                return fail(f"cannot compare: the {label} results are on suite {results.suite!r}, which is not "
                            "built in and has no run.json beside its results.json; give the suite file with --suite")
        else:
            chosen = load_suite("test")
        if resolution is None:
            resolution = next((tuple(r.data["resolution"]) for r in given.values() if r.data.get("resolution")),
                              (66, 200))
        evaluator = PolicyEvaluator(Path(out) if out else default_cache_dir(), workers=workers, progress=progress,
                                    plots=plots, no_cache=no_cache)
        loaded = {}
        for label, source in sides.items():
            if label in given:
                loaded[label] = given[label]
            else:
                loaded[label] = evaluator(source, chosen, resolution=resolution, policy_kwargs=kwargs[label])
                print(f"{label} {source}: results in {loaded[label].path.parent}", file=stdout)
        comparison = compare(loaded["candidate"], loaded["baseline"], tolerances, statistical=statistical)
    except IncomparableError as error:
        return fail(f"cannot compare: {error}")
    except (ResultsError, ToleranceError, SuiteError, CheckpointError, FileNotFoundError, ValueError) as error:
        return fail(str(error))
    print(comparison.table(), file=stdout)
    if out:
        report = path_under(out, "regress.json")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(comparison.to_dict(), indent=1, sort_keys=True))
        print(f"report: {report}", file=stdout)
    return comparison.exit_code
