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

import functools
import hashlib
import json
import math
import numbers
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from steerloop.errors import SteerloopError
from steerloop.evaluation.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE, bootstrap_ci
from steerloop.evaluation.runner import DEFAULT_BATCH, RESULTS_SCHEMA_VERSION, ResultsError, evaluate
from steerloop.evaluation.suites import Scenario, Suite, SuiteError, check_scenario_names, load_suite
from steerloop.paths import path_under, slug
from steerloop.sim.wrappers import Perturbation

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_INCOMPARABLE = 2

NEWLY_FAILING = "newly_failing_scenarios"  # tolerance-file key for per-scenario pass -> fail flips
_FLOAT_SLACK = 1e-9  # relative; keeps "exactly at the tolerance" from failing on rounding


class ToleranceError(SteerloopError):
    """A tolerance file or mapping is malformed; the message names the file and the field."""


class IncomparableError(ResultsError):
    """Two results cannot be compared (different suite, scenarios, seeds, resolution or schema)."""


# ----------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """How much worse a metric may get: the larger of ``absolute`` (in the metric's unit)
    and ``relative`` x |baseline value|. (0, 0) means it may not get worse at all."""

    absolute: float = 0.0
    relative: float = 0.0

    def allowed(self, baseline: float) -> float:
        return max(self.absolute, self.relative * abs(baseline))


@dataclass(frozen=True)
class GateMetric:
    """An aggregate of ``results.json`` the gate compares, its direction and default tolerance.

    ``per_scenario`` is the per-scenario metric the statistical mode pairs (None: the
    aggregate has no per-scenario counterpart and is reported, not tested, in that mode)."""

    name: str
    higher_is_better: bool
    tolerance: Tolerance
    unit: str
    per_scenario: str | None


GATE_METRICS: tuple[GateMetric, ...] = (
    GateMetric("success_rate", True, Tolerance(0.0, 0.0), "fraction", "success"),
    GateMetric("route_completion", True, Tolerance(0.01, 0.0), "fraction", "route_completion"),
    GateMetric("mean_abs_offset_m", False, Tolerance(0.005, 0.10), "m", "mean_abs_offset_m"),
    GateMetric("max_abs_offset_m", False, Tolerance(0.02, 0.10), "m", "max_abs_offset_m"),
    GateMetric("rms_heading_error_rad", False, Tolerance(0.002, 0.10), "rad", "rms_heading_error_rad"),
    GateMetric("departures_per_km", False, Tolerance(0.1, 0.10), "1/km", "departures_per_km"),
    GateMetric("time_outside_lane_s", False, Tolerance(0.1, 0.10), "s", "time_outside_lane_s"),
    GateMetric("on_policy_rmse", False, Tolerance(0.002, 0.10), "steering", "on_policy_rmse"),
    GateMetric("smoothness_per_s", False, Tolerance(0.01, 0.25), "1/s", "smoothness_per_s"),
    GateMetric("recovery_rate", True, Tolerance(0.0, 0.0), "fraction", "recovery_rate"),
    GateMetric("median_recovery_time_s", False, Tolerance(0.1, 0.20), "s", None),
    GateMetric("mean_overshoot_m", False, Tolerance(0.02, 0.20), "m", None),
    GateMetric("autonomy_pct", True, Tolerance(0.0, 0.0), "%", "autonomy_pct"),
)
METRICS: dict[str, GateMetric] = {m.name: m for m in GATE_METRICS}


@dataclass(frozen=True)
class Tolerances:
    """Per-metric tolerances plus how many scenarios may go from pass to fail
    (``newly_failing``: absolute = a count, relative = a fraction of the suite's scenarios)."""

    metrics: Mapping[str, Tolerance] = field(default_factory=lambda: {m.name: m.tolerance for m in GATE_METRICS})
    newly_failing: Tolerance = Tolerance(0.0, 0.0)

    def for_metric(self, name: str) -> Tolerance:
        return self.metrics.get(name, METRICS[name].tolerance)


def parse_tolerances(spec: Mapping, source: str = "tolerances") -> Tolerances:
    """Tolerances from a mapping ``{"metric": {"abs": A, "rel": R}, ...}``; an entry replaces
    that metric's default (a missing ``abs`` or ``rel`` is 0), other metrics keep theirs."""
    if not isinstance(spec, Mapping):
        raise ToleranceError(f"{source}: must be a table of metric -> {{abs, rel}}, got {type(spec).__name__}")
    known = sorted([*METRICS, NEWLY_FAILING])
    metrics = {m.name: m.tolerance for m in GATE_METRICS}
    newly_failing = Tolerance()
    for name, entry in spec.items():
        if name not in METRICS and name != NEWLY_FAILING:
            raise ToleranceError(f"{source}: unknown metric {name!r}; known metrics: {', '.join(known)}")
        if not isinstance(entry, Mapping):
            raise ToleranceError(f"{source}: {name} must be a table like {{\"abs\": 0.01}} or {{\"rel\": 0.05}}, "
                                 f"got {entry!r}")
        if not entry:
            raise ToleranceError(f"{source}: {name} is empty; give 'abs' and/or 'rel'")
        values = {}
        for key, value in entry.items():
            if key not in ("abs", "rel"):
                raise ToleranceError(f"{source}: {name}.{key} is not a tolerance field; use 'abs' (in the metric's "
                                     "unit) and/or 'rel' (a fraction of the baseline value)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ToleranceError(f"{source}: {name}.{key} must be a finite number >= 0, got {value!r}")
            values[key] = float(value)
        tolerance = Tolerance(values.get("abs", 0.0), values.get("rel", 0.0))
        if name == NEWLY_FAILING:
            newly_failing = tolerance
        else:
            metrics[name] = tolerance
    return Tolerances(metrics, newly_failing)


def load_tolerances(path: str | os.PathLike) -> Tolerances:
    """Tolerances from a JSON (``.json``) or TOML (``.toml``) file."""
    path = Path(path)
    if not path.is_file():
        raise ToleranceError(f"tolerance file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as error:
            raise ToleranceError(f"{path}: not valid JSON ({error})") from None
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:
            raise ToleranceError(f"{path}: TOML tolerance files need Python >= 3.11 (tomllib); "
                                 "write the same table as JSON instead") from None
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ToleranceError(f"{path}: not valid TOML ({error})") from None
    else:
        raise ToleranceError(f"tolerance file {path} must end in .json or .toml")
    return parse_tolerances(spec, str(path))


def as_tolerances(tolerances) -> Tolerances:
    """None (defaults), a :class:`Tolerances`, a mapping in the file format or a file path."""
    if tolerances is None:
        return Tolerances()
    if isinstance(tolerances, Tolerances):
        return tolerances
    if isinstance(tolerances, (str, os.PathLike)):
        return load_tolerances(tolerances)
    return parse_tolerances(tolerances)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class ScenarioResult:
    """One scenario of a results file; its metrics are attributes too (``s.mean_abs_offset_m``)."""

    name: str
    track: int | str | None
    condition: str
    seed: int
    metrics: dict

    @property
    def success(self) -> bool:
        return bool(self.metrics.get("success"))

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "metrics":
            raise AttributeError(name)
        try:
            return self.metrics[name]
        except KeyError:
            raise AttributeError(f"scenario {self.name} has no metric {name!r}; "
                                 f"metrics: {', '.join(sorted(self.metrics))}") from None


@dataclass(frozen=True)
class EvaluationResult:
    """A ``results.json`` with attribute access: ``result.success_rate``, ``result.scenarios``,
    ``result.failed_scenarios``, any aggregate by name; ``result.data`` is the whole dict."""

    data: dict
    path: Path | None = None

    @property
    def policy(self) -> str:
        return self.data["policy"]["name"]

    @property
    def suite(self) -> str:
        return self.data["suite"]

    @property
    def aggregate(self) -> dict:
        return self.data["aggregate"]

    @property
    def scenarios(self) -> tuple[ScenarioResult, ...]:
        return tuple(ScenarioResult(s["name"], s.get("track"), s.get("condition", "default"), s.get("seed", 0),
                                    s["metrics"]) for s in self.data["scenarios"])

    @property
    def failed_scenarios(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.scenarios if not s.success)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("data", "path"):
            raise AttributeError(name)
        aggregate = self.data["aggregate"]
        if name in aggregate:
            return aggregate[name]
        raise AttributeError(f"results of {self.policy} on {self.suite} have no aggregate {name!r}; "
                             f"aggregates: {', '.join(sorted(aggregate))}")


def _validated(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise IncomparableError(f"{where}: not a steerloop results object (expected a JSON object)")
    for key in ("schema_version", "policy", "suite", "seeds", "scenarios", "aggregate"):
        if key not in data:
            raise IncomparableError(f"{where}: not a steerloop results.json (missing {key!r}); "
                                    "give a results directory written by `steerloop evaluate`")
    if not isinstance(data["scenarios"], list) or not all(isinstance(s, dict) and "name" in s and "metrics" in s
                                                          for s in data["scenarios"]):
        raise IncomparableError(f"{where}: 'scenarios' must be a list of objects with 'name' and 'metrics'")
    return data


def results_path(source: str | os.PathLike) -> Path | None:
    """The ``results.json`` that ``source`` names (the file or a directory holding it), or None
    when ``source`` is not a results location (then it is a policy). An interrupted results
    directory (``run.json`` but no ``results.json``) is refused."""
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir():
        if (path / "results.json").is_file():
            return path / "results.json"
        if (path / "run.json").is_file():
            raise IncomparableError(f"{path} is an unfinished results directory (run.json but no results.json); "
                                    "finish it by re-running the same `steerloop evaluate` command")
    return None


def load_results(source) -> EvaluationResult:
    """An :class:`EvaluationResult` from a results dict, a ``results.json`` or a results directory."""
    if isinstance(source, EvaluationResult):
        return source
    if isinstance(source, dict):
        return EvaluationResult(_validated(source, "results"))
    path = results_path(source)
    if path is None:
        raise IncomparableError(f"{source} is neither a results directory nor a results.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise IncomparableError(f"{path}: not valid JSON ({error})") from None
    return EvaluationResult(_validated(data, str(path)), path)


def _scenario_identity(entry: dict) -> tuple:
    return entry["name"], entry.get("track"), entry.get("condition"), entry.get("seed")


def _suite_scenario_identity(scenario: Scenario) -> tuple:
    track = scenario.track if isinstance(scenario.track, int) else scenario.track.get("name")
    return scenario.name, track, scenario.condition, scenario.seed


def _first_difference(a: list, b: list, what: str, label_a: str, label_b: str) -> str:
    if len(a) != len(b):
        return f"{what}: {label_a} has {len(a)}, {label_b} has {len(b)}"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"{what} differ at scenario {i}: {label_a} {a[i]!r}, {label_b} {b[i]!r}"


def check_results_match_suite(results: EvaluationResult, suite: Suite, label: str) -> None:
    """Raise :class:`IncomparableError` unless ``results`` were evaluated on ``suite``."""
    if results.suite != suite.name:
        raise IncomparableError(f"different suites: the {label} results are on {results.suite!r}, "
                                f"--suite is {suite.name!r}")
    got = [_scenario_identity(s) for s in results.data["scenarios"]]
    want = [_suite_scenario_identity(s) for s in suite.scenarios]
    if got != want:
        raise IncomparableError("different scenarios in suite " + repr(suite.name) + ": "
                                + _first_difference(got, want, "(name, track, condition, seed)", label, "--suite"))


def check_comparable(candidate: EvaluationResult, baseline: EvaluationResult) -> None:
    """Raise :class:`IncomparableError` (with the reason) unless both results come from the
    same suite, scenarios, seeds, resolution and schema version."""
    versions = candidate.data["schema_version"], baseline.data["schema_version"]
    if versions[0] != versions[1]:
        raise IncomparableError(f"different results schema versions: candidate {versions[0]}, baseline "
                                f"{versions[1]}; re-evaluate the older one with this steerloop")
    if str(versions[0]).split(".")[0] != RESULTS_SCHEMA_VERSION.split(".")[0]:
        raise IncomparableError(f"results schema version {versions[0]} is not readable by this steerloop "
                                f"(schema {RESULTS_SCHEMA_VERSION})")
    if candidate.suite != baseline.suite:
        raise IncomparableError(f"different suites: candidate {candidate.suite!r}, baseline {baseline.suite!r}")
    names = [s["name"] for s in candidate.data["scenarios"]], [s["name"] for s in baseline.data["scenarios"]]
    if names[0] != names[1]:
        raise IncomparableError(_first_difference(*names, "different scenario names", "candidate", "baseline"))
    if list(candidate.data["seeds"]) != list(baseline.data["seeds"]):
        raise IncomparableError(_first_difference(list(candidate.data["seeds"]), list(baseline.data["seeds"]),
                                                  "different seeds", "candidate", "baseline"))
    identity = ([_scenario_identity(s) for s in candidate.data["scenarios"]],
                [_scenario_identity(s) for s in baseline.data["scenarios"]])
    if identity[0] != identity[1]:
        raise IncomparableError(_first_difference(*identity, "different scenarios (name, track, condition, seed)",
                                                  "candidate", "baseline"))
    resolutions = candidate.data.get("resolution"), baseline.data.get("resolution")
    if resolutions[0] != resolutions[1]:
        raise IncomparableError(f"different camera resolutions: candidate {resolutions[0]}, baseline "
                                f"{resolutions[1]}")


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


# ----------------------------------------------------------------------------- evaluation cache
def default_cache_dir() -> Path:
    """``$STEERLOOP_CACHE``, else ``$XDG_CACHE_HOME/steerloop``, else ``~/.cache/steerloop``."""
    if os.environ.get("STEERLOOP_CACHE"):
        return Path(os.environ["STEERLOOP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "steerloop"


def _hash_files(root: Path, files) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of steerloop's own source (sim, agents, training, evaluation): cached results
    are reused only by the code that produced them."""
    root = Path(__file__).resolve().parents[1]
    files = [p for package in ("sim", "agents", "training", "evaluation") for p in (root / package).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return _hash_files(root, files)


def policy_fingerprint(policy, kwargs: dict | None = None) -> str:
    """The cache key of a policy (a spec with ``kwargs``, or an object): the content of a
    checkpoint directory or ``.zip`` (so retrained weights at the same path are evaluated
    again); a built-in policy is its name (its code is in :func:`code_fingerprint`); a user
    policy, its ``cache_key()``, else a hash of its module's source and of the files its
    kwargs name (:func:`steerloop.agents.spec.policy_fingerprint`)."""
    from steerloop.agents.spec import policy_fingerprint as fingerprint
    from steerloop.agents.spec import policy_ref

    return fingerprint(policy_ref(policy, kwargs))


def _json_key(value) -> str:
    return json.dumps(value, sort_keys=True, default=list)


@dataclass
class PolicyEvaluator:
    """Evaluates policies on suites into ``root`` (one directory per policy content, suite,
    resolution and steerloop source) and remembers results for the life of the object, so
    each (policy, suite) is evaluated once; an unchanged policy is never re-driven."""

    root: Path = field(default_factory=default_cache_dir)
    workers: int = 1
    progress: bool = False
    plots: bool = False
    no_cache: bool = False
    """Evaluate again, replacing cached results (once per policy and suite for this object)."""
    _memory: dict = field(default_factory=dict, repr=False)

    def run_dir(self, policy, suite: Suite, resolution=(66, 200), *, policy_kwargs: dict | None = None,
                name: str | None = None) -> Path:
        """The results directory of ``policy`` (a spec or an object) on ``suite``: keyed by the
        policy's name and cache key (:func:`policy_fingerprint`), the suite, the resolution and
        steerloop's source."""
        from steerloop.agents.spec import policy_fingerprint as fingerprint
        from steerloop.agents.spec import policy_ref

        ref = policy_ref(policy, policy_kwargs, name)
        identity = {"policy": ref.name, "content": fingerprint(ref), "suite": suite.to_dict(),
                    "resolution": list(resolution), "batch": DEFAULT_BATCH, "code": code_fingerprint()}
        if ref.kwargs:
            identity["policy_kwargs"] = ref.kwargs
        key = hashlib.sha256(_json_key(identity).encode())
        # The policy (often a checkpoint path) is slugged for the directory name; results.json keeps it as given.
        return path_under(self.root, f"{slug(ref.name)}-{slug(suite.name, default='suite')}-{key.hexdigest()[:16]}")

    def __call__(self, policy, suite: str | os.PathLike | Suite = "test", *, resolution=(66, 200),
                 policy_kwargs: dict | None = None, name: str | None = None) -> EvaluationResult:
        """Evaluate ``policy`` on ``suite`` (a built-in name, a suite JSON file or a
        :class:`Suite`). ``policy`` is a policy spec (``expert``, ``zeros``, a checkpoint
        directory, a ``.zip``, ``package.module:attr``, ``path/to/file.py:attr``; a user's class
        or factory gets ``policy_kwargs``) or a policy object; ``name`` is what results call it."""
        policy = os.fspath(policy) if isinstance(policy, os.PathLike) else policy
        suite = suite if isinstance(suite, Suite) else load_suite(str(suite))
        resolution = tuple(int(v) for v in resolution)
        out = self.run_dir(policy, suite, resolution, policy_kwargs=policy_kwargs, name=name)
        memo = (out, id(policy) if not isinstance(policy, str) else policy)
        if memo not in self._memory:
            if self.no_cache and out.exists():
                shutil.rmtree(out)
            data = evaluate(policy, suite, out, policy_kwargs=policy_kwargs, name=name, workers=self.workers,
                            resolution=resolution, progress=self.progress, plots=self.plots)
            self._memory[memo] = EvaluationResult(json.loads(json.dumps(data)), out / "results.json")
        return self._memory[memo]


# ----------------------------------------------------------------------------- the command
def suite_from_dict(spec: dict) -> Suite:
    """A :class:`Suite` from ``Suite.to_dict()`` (as stored in a results directory's run.json)."""
    scenarios = []
    for s in spec["scenarios"]:
        fields = dict(s)
        fields["perturbations"] = tuple(Perturbation(**p) for p in s.get("perturbations", ()))
        scenarios.append(Scenario(**fields))
    return Suite(spec["name"], tuple(scenarios))


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
