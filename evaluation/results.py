"""Results of a closed-loop evaluation: one loader (``results.json`` or its directory, checked)
and attribute access (:class:`EvaluationResult`), and the checks that two results or a result
and a suite describe the same scenarios."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from steerloop.evaluation.runner import RESULTS_SCHEMA_VERSION, ResultsError
from steerloop.evaluation.suites import Scenario, Suite


class IncomparableError(ResultsError):
    """Two results cannot be compared (different suite, scenarios, seeds, resolution or schema)."""



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


