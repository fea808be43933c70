"""Scenario suites: fixed, reproducible sets of closed-loop scenarios.

A scenario is a track, a visual condition, a speed, a perturbation schedule and whether
NVIDIA-style interventions are on, plus a reset seed derived from the suite's name and
the scenario's position, so a suite means the same thing on every machine and run.

Built in: ``smoke`` (3 short tracks, for tests), ``test`` (20 held-out procedural tracks),
``recovery`` (the test tracks with standard perturbations on straights and in curves),
``shift`` (training-split tracks under held-out visual conditions), ``generalization`` (the
test tracks under held-out conditions) and ``interventions`` (the test tracks in
intervention mode, for autonomy %). With ``test`` (new tracks, the training condition) they
make Codevilla et al.'s 2x2 of training/new tracks x training/new conditions. Users' suites
are JSON files.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from steerloop.errors import SteerloopError, check_keys, read_json
from steerloop.sim.env import load_track
from steerloop.paths import UnsafeNameError, safe_name
from steerloop.sim import conditions as conditions_model
from steerloop.sim.track import MAX_ROUTE_LENGTH, TRACKS_DIR, Track, TrackSpecError, split_seed
from steerloop.sim.wrappers import Perturbation

TEST_TRACKS = 20  # held-out procedural tracks in the `test` family of suites
VAL_TRACKS = 10  # validation tracks (model selection, DAgger iterations)
SMOKE_TRACK_LENGTH = 150.0  # [m]
DEFAULT_SPEED = 10.0  # [m/s]
CONTROL_DT = 0.05  # [s] at the default 20 Hz control rate
CURVE_CURVATURE = 1.0 / 150.0  # [1/m] |curvature| above which a point counts as "in a curve"
FIRST_PERTURBATION_STEP = 60  # [steps] leave the start alone for 3 s
PERTURBATION_SPACING = 160  # [steps] between perturbation starts (25 acting + 100 recovery + margin)
HELD_OUT_CONDITIONS = conditions_model.held_out_conditions()  # the built-in new conditions
TRAINING_CONDITIONS = conditions_model.training_conditions()
CONDITION_GROUPS = {"train": TRAINING_CONDITIONS, "held_out": HELD_OUT_CONDITIONS}  # suite-file shorthands


@dataclass(frozen=True)
class Scenario:
    """One closed-loop run: everything needed to reproduce it."""

    name: str
    track: int | dict
    condition: str = "default"
    speed: float = DEFAULT_SPEED
    perturbations: tuple[Perturbation, ...] = ()
    interventions: bool = False
    seed: int = 0
    track_length: float = 400.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["perturbations"] = [p.to_dict() for p in self.perturbations]
        return d


@dataclass(frozen=True)
class Suite:
    name: str
    scenarios: tuple[Scenario, ...] = field(default_factory=tuple)
    condition_file: conditions_model.ConditionFile | None = None
    """The user's condition file whose conditions the scenarios may name (its content travels
    with the suite to worker processes and into run.json; the file is read once)."""

    def to_dict(self) -> dict:
        d = {"name": self.name, "scenarios": [s.to_dict() for s in self.scenarios]}
        if self.condition_file is not None:  # suites without one keep their dict (run ids, cache keys)
            d["condition_file"] = self.condition_file.to_dict()
        # what its conditions look like: run ids and cache keys change when a condition's values do
        d["world"] = conditions_model.world_digest(
            [s.condition for s in self.scenarios],
            self.condition_file.conditions if self.condition_file is not None else conditions_model.BUILTIN)
        return d

    @property
    def has_perturbations(self) -> bool:
        return any(s.perturbations for s in self.scenarios)

    @property
    def has_interventions(self) -> bool:
        return any(s.interventions for s in self.scenarios)


def scenario_seed(suite: str, index: int) -> int:
    """The fixed reset seed of scenario ``index`` of suite ``suite``."""
    return int(np.random.default_rng([zlib.crc32(suite.encode()), index]).integers(2**31))


def standard_perturbations(track: Track, speed: float, index: int) -> tuple[Perturbation, ...]:
    """A lateral push, a heading kick and a steering pulse (signs alternating with ``index``),
    at fixed times chosen alternately where the road is straight and where it curves.

    Each perturbation gets PERTURBATION_SPACING steps (acting + 5 s recovery window +
    margin); a route too short for all three gets as many as fit, in that order.
    """
    steps_total = int((track.length - 20.0) / (speed * CONTROL_DT))
    kinds = [Perturbation.push, Perturbation.kick, Perturbation.pulse]

    def in_curve(step: int) -> bool:
        return abs(float(track.curvature_at(step * speed * CONTROL_DT))) > CURVE_CURVATURE

    chosen, cursor = [], FIRST_PERTURBATION_STEP
    for k, make in enumerate(kinds):
        if steps_total - PERTURBATION_SPACING < cursor:
            break  # not even this one fits
        # Search for a straight/curve only while the remaining perturbations still fit after it.
        latest = max(steps_total - PERTURBATION_SPACING * (len(kinds) - k), cursor)
        want_curve = (k + index) % 2 == 1
        start = next((t for t in range(cursor, latest + 1, 5) if in_curve(t) == want_curve), cursor)
        base = make(start)
        sign = 1.0 if (k + index) % 2 == 0 else -1.0
        chosen.append(Perturbation(base.kind, start, sign * base.magnitude, base.duration))
        cursor = start + PERTURBATION_SPACING
    return tuple(chosen)


def _test_scenarios(suite: str, condition_for, perturb: bool = False, interventions: bool = False,
                    split: str = "test") -> Suite:
    scenarios = []
    for i in range(TEST_TRACKS):
        seed = split_seed(split, i)
        perturbations = ()
        if perturb:
            perturbations = standard_perturbations(load_track(seed), DEFAULT_SPEED, i)
        scenarios.append(Scenario(name=f"{suite}-{i:02d}-proc-{seed}", track=seed, condition=condition_for(i),
                                  perturbations=perturbations, interventions=interventions,
                                  seed=scenario_seed(suite, i)))
    return Suite(suite, tuple(scenarios))


def builtin_suite(name: str) -> Suite:
    if name == "smoke":
        scenarios = [Scenario(name=f"smoke-{i}-proc-{split_seed('test', i)}", track=split_seed("test", i),
                              track_length=SMOKE_TRACK_LENGTH, seed=scenario_seed("smoke", i)) for i in range(2)]
        spec = json.loads((TRACKS_DIR / "s-bend.json").read_text())
        scenarios.append(Scenario(name="smoke-2-s-bend", track=spec, seed=scenario_seed("smoke", 2)))
        return Suite("smoke", tuple(scenarios))
    if name == "test":
        return _test_scenarios("test", lambda i: "default")
    if name == "val":
        return Suite("val", tuple(Scenario(name=f"val-{i:02d}-proc-{split_seed('val', i)}", track=split_seed("val", i),
                                           seed=scenario_seed("val", i)) for i in range(VAL_TRACKS)))
    if name == "recovery":
        return _test_scenarios("recovery", lambda i: "default", perturb=True)
    if name == "shift":
        return _test_scenarios("shift", lambda i: HELD_OUT_CONDITIONS[i % len(HELD_OUT_CONDITIONS)], split="train")
    if name == "generalization":
        return _test_scenarios("generalization", lambda i: HELD_OUT_CONDITIONS[i % len(HELD_OUT_CONDITIONS)])
    if name == "interventions":
        return _test_scenarios("interventions", lambda i: "default", interventions=True)
    raise ValueError(f"unknown suite {name!r}; built-in suites: {BUILTIN_SUITES}, or give a suite JSON file")


BUILTIN_SUITES = ("smoke", "val", "test", "recovery", "shift", "generalization", "interventions")
SUITE_KEYS = ("name", "tracks", "conditions", "condition_file", "speed", "interventions", "perturbations",
              "track_length", "comment", "description")  # the keys of a suite JSON file
PERTURBATION_KEYS = ("kind", "start_step", "magnitude", "duration")


class SuiteError(SteerloopError):
    """A user's suite file is malformed; the message names the file and the field."""


def _parse_perturbation(item, where: str) -> Perturbation:
    if not isinstance(item, dict):
        raise SuiteError(f"{where}: must be an object like "
                         '{"kind": "lateral_push", "start_step": 60, "magnitude": 0.5, "duration": 25}')
    check_keys(item, PERTURBATION_KEYS, where, SuiteError)
    missing = [k for k in PERTURBATION_KEYS if k not in item]
    if missing:
        raise SuiteError(f"{where}: missing {missing}")
    try:
        return Perturbation(str(item["kind"]), int(item["start_step"]), float(item["magnitude"]),
                            int(item["duration"]))
    except (TypeError, ValueError) as error:
        raise SuiteError(f"{where}: {error}") from None


def _safe(value, field: str, path: str | Path) -> str:
    """``value`` if it is safe as a file name (it names result files), else SuiteError."""
    try:
        return safe_name(value, field=field, source=str(path))
    except UnsafeNameError as error:
        raise SuiteError(str(error)) from None


def check_scenario_names(suite: Suite, source: str) -> None:
    """SuiteError unless the suite's and every scenario's name is safe as a file name and
    no two scenarios share a name (each names its result files). Suites built in Python or
    read back from a run.json are not checked when parsed; the runner checks them here."""
    _safe(suite.name, "suite name", source)
    seen = set()
    for i, scenario in enumerate(suite.scenarios):
        _safe(scenario.name, f"scenarios[{i}].name", source)
        if scenario.name in seen:
            raise SuiteError(f"{source}: scenarios[{i}].name {scenario.name!r} is used twice; scenario names name "
                             "result files, so each must be unique")
        seen.add(scenario.name)


def load_suite_file(path: str | Path, condition_file: str | None = None) -> Suite:
    """A suite from a JSON file; track and condition-file paths are relative to the file.
    ``condition_file`` (e.g. ``evaluate --condition-file``) serves a suite that names none."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite file {path} does not exist; give a built-in suite name {BUILTIN_SUITES} "
                         "or the path of a suite JSON file")
    spec = read_json(path, "suite", SuiteError)
    if not isinstance(spec, dict):
        raise SuiteError(f"{path}: the suite must be a JSON object")
    check_keys(spec, SUITE_KEYS, f"suite {path}", SuiteError)
    name = _safe(spec["name"], "'name'", path) if "name" in spec else \
        _safe(path.stem, "the file name (the suite's name when it has no 'name')", path)
    tracks = spec.get("tracks")
    if not isinstance(tracks, list) or not tracks:
        raise SuiteError(f"{path}: 'tracks' must be a non-empty list of track seeds or spec paths")
    source = _condition_file(spec, path, condition_file)
    conditions = spec.get("conditions", ["default"])
    if not isinstance(conditions, list) or not conditions:
        raise SuiteError(f"{path}: 'conditions' must be a non-empty list")
    conditions = _expand_conditions(conditions, path, source.conditions if source else conditions_model.BUILTIN)
    speed = spec.get("speed", DEFAULT_SPEED)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 < speed <= 40:
        raise SuiteError(f"{path}: 'speed' must be a number in (0, 40] m/s, got {speed!r}")
    interventions = spec.get("interventions", False)
    if not isinstance(interventions, bool):
        raise SuiteError(f"{path}: 'interventions' must be true or false, got {interventions!r}")
    perturbations = spec.get("perturbations", "none")
    track_length = spec.get("track_length", Scenario.track_length)
    if isinstance(track_length, bool) or not isinstance(track_length, (int, float)) or \
            not 50 <= track_length <= MAX_ROUTE_LENGTH:
        raise SuiteError(f"{path}: 'track_length' (of procedural tracks) must be a number in [50, "
                         f"{MAX_ROUTE_LENGTH:g}] m, got {track_length!r}")
    scenarios, index = [], 0
    for t, entry in enumerate(tracks):
        where = f"{path}: tracks[{t}]"
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise SuiteError(f"{where}: must be a procedural track seed (integer) or a spec path (string)")
        try:
            track = load_track(entry if isinstance(entry, int) else str(path.parent / entry), length=track_length)
        except (TrackSpecError, FileNotFoundError, ValueError) as error:
            raise SuiteError(f"{where}: {error}") from None
        _safe(track.name, f"tracks[{t}]: the track's name (its spec's 'name', else its file name)", path)
        track_value = entry if isinstance(entry, int) else track.to_spec()
        if perturbations == "none":
            schedule = ()
        elif perturbations == "standard":
            schedule = standard_perturbations(track, float(speed), t)
        elif isinstance(perturbations, list):
            schedule = tuple(_parse_perturbation(item, f"{path}: perturbations[{k}]")
                             for k, item in enumerate(perturbations))
        else:
            raise SuiteError(f"{path}: 'perturbations' must be \"none\", \"standard\" or a list of perturbations")
        for condition in conditions:
            scenario = _safe(f"{name}-{index:02d}-{track.name}-{condition}",
                             "scenario name (suite name-index-track name-condition)", path)
            scenarios.append(Scenario(name=scenario, track=track_value,
                                      condition=condition, speed=float(speed), perturbations=schedule,
                                      interventions=interventions, seed=scenario_seed(name, index),
                                      track_length=float(track_length)))
            index += 1
    return Suite(name, tuple(scenarios), source)


def _condition_file(spec: dict, path: Path, given: str | None) -> conditions_model.ConditionFile | None:
    """The suite's condition file: its own ``condition_file`` (relative to the suite file), else ``given``."""
    own = spec.get("condition_file")
    if own is None:
        return read_condition_file(given) if given is not None else None
    if not isinstance(own, str) or not own:
        raise SuiteError(f"{path}: 'condition_file' must be the path of a JSON or TOML condition file (relative "
                         f"to the suite file), got {own!r}")
    source = read_condition_file(path.parent / own)
    if given is not None and read_condition_file(given).sha256 != source.sha256:
        raise SuiteError(f"{path}: the suite names condition_file {own!r}, and {given} (another content) was given "
                         "as well; give only one")
    return source


def read_condition_file(path) -> conditions_model.ConditionFile:
    """A condition file; its errors are SuiteErrors (they name the file, the field and the valid values)."""
    try:
        return conditions_model.read_condition_file(path)
    except conditions_model.ConditionError as error:
        raise SuiteError(str(error)) from None


def _expand_conditions(conditions: list, path: Path,
                       available: conditions_model.ConditionSet = conditions_model.BUILTIN) -> list[str]:
    """The suite file's conditions, with "train" / "held_out" standing for every named
    condition of that split (built in, and from the suite's condition file); each checked (the
    error names the entry and the valid values)."""
    out = []
    for i, condition in enumerate(conditions):
        if isinstance(condition, str) and condition in CONDITION_GROUPS:
            out += available.names(condition)
            continue
        try:
            available.resolve(condition, where=f"{path}: conditions[{i}]")
        except conditions_model.ConditionError as error:
            raise SuiteError(f"{error}, or \"train\" / \"held_out\" for every condition of that split") from None
        out.append(condition)
    return out


def load_suite(name_or_path: str, condition_file: str | None = None) -> Suite:
    """A built-in suite by name, or a user's suite JSON file; ``condition_file`` adds a user's
    condition file (a suite file may name its own instead)."""
    if name_or_path in BUILTIN_SUITES:
        suite = builtin_suite(name_or_path)
        return suite if condition_file is None else Suite(suite.name, suite.scenarios,
                                                          read_condition_file(condition_file))
    if name_or_path.endswith(".json") or Path(name_or_path).exists():
        return load_suite_file(name_or_path, condition_file)
    raise SuiteError(f"unknown suite {name_or_path!r}; built-in suites: {BUILTIN_SUITES}, or give a suite JSON file")
