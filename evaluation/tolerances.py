"""Regression-gate tolerances: per-metric limits (absolute and relative) from a JSON or TOML
file, or defaults (docs/regress.md)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from steerloop.errors import SteerloopError

NEWLY_FAILING = "newly_failing_scenarios"  # tolerance-file key for per-scenario pass -> fail flips


class ToleranceError(SteerloopError):
    """A tolerance file or mapping is malformed; the message names the file and the field."""



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


