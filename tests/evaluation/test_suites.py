"""Scenario suites (evaluation.suites): built-in sizes, stable seeds, user suite files and
their error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from steerloop.evaluation.suites import (BUILTIN_SUITES, HELD_OUT_CONDITIONS, TEST_TRACKS, Scenario, SuiteError, builtin_suite,
                               load_suite, load_suite_file, scenario_seed, standard_perturbations)
from steerloop.sim.env import load_track
from steerloop.sim.track import split_seed
from steerloop.sim.wrappers import Perturbation

SHIPPED_TRACKS = Path(__file__).resolve().parents[2] / "sim" / "tracks"

DOCUMENTED_SUITE = {"name": "mine", "tracks": ["tracks/s-bend.json", 200001], "conditions": ["default"],
                    "speed": 10.0, "perturbations": "standard", "interventions": False}


@pytest.fixture
def suite_dir(tmp_path) -> Path:
    """tmp_path with tracks/s-bend.json copied in."""
    (tmp_path / "tracks").mkdir()
    shutil.copy(SHIPPED_TRACKS / "s-bend.json", tmp_path / "tracks" / "s-bend.json")
    return tmp_path


def write_suite(directory: Path, spec, name: str = "suite.json") -> Path:
    path = directory / name
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return path


# ----------------------------------------------------------------------------- built-in suites
def test_builtin_suite_names():
    assert set(BUILTIN_SUITES) == {"smoke", "val", "test", "recovery", "shift", "generalization", "interventions"}


def test_val_suite_uses_validation_tracks_disjoint_from_test():
    val, test = builtin_suite("val"), builtin_suite("test")
    assert len(val.scenarios) == 10
    assert {s.track for s in val.scenarios}.isdisjoint({s.track for s in test.scenarios})
    assert all(100_000 <= s.track < 200_000 for s in val.scenarios)


def test_smoke_suite():
    suite = builtin_suite("smoke")
    assert suite.name == "smoke" and len(suite.scenarios) == 3
    assert len({s.name for s in suite.scenarios}) == 3
    assert not suite.has_perturbations and not suite.has_interventions
    assert all(s.condition == "default" for s in suite.scenarios)
    # two short held-out procedural tracks and the shipped s-bend
    assert [s.track for s in suite.scenarios[:2]] == [split_seed("test", 0), split_seed("test", 1)]
    assert suite.scenarios[2].track["name"] == "s-bend"


@pytest.mark.parametrize("name", ["test", "recovery", "generalization", "interventions"])
def test_test_family_has_at_least_20_held_out_tracks(name):
    suite = builtin_suite(name)
    assert len(suite.scenarios) >= 20 and len(suite.scenarios) == TEST_TRACKS
    assert all(isinstance(s.track, int) and 200_000 <= s.track < 300_000 for s in suite.scenarios)
    assert len({s.track for s in suite.scenarios}) == len(suite.scenarios)
    # all of them drive the same held-out tracks
    assert [s.track for s in suite.scenarios] == [s.track for s in builtin_suite("test").scenarios]


def test_test_suite_is_plain():
    suite = builtin_suite("test")
    assert not suite.has_perturbations and not suite.has_interventions
    assert {s.condition for s in suite.scenarios} == {"default"}


def test_recovery_suite_perturbs_every_scenario():
    suite = builtin_suite("recovery")
    assert suite.has_perturbations and not suite.has_interventions
    for scenario in suite.scenarios:
        assert scenario.perturbations, scenario.name
        assert all(isinstance(q, Perturbation) for q in scenario.perturbations)
        ordered = sorted(scenario.perturbations, key=lambda q: q.start_step)
        for a, b in zip(ordered, ordered[1:]):
            assert b.start_step >= a.end_step, f"{scenario.name}: perturbations overlap"
        assert ordered[0].start_step >= 60  # the start of the route is left alone


def test_recovery_suite_has_a_push_a_kick_and_a_pulse_everywhere():
    for scenario in builtin_suite("recovery").scenarios:
        kinds = sorted(q.kind for q in scenario.perturbations)
        assert kinds == ["heading_kick", "lateral_push", "steering_pulse"], scenario.name


def test_interventions_suite_flags_every_scenario():
    suite = builtin_suite("interventions")
    assert suite.has_interventions and not suite.has_perturbations
    assert all(s.interventions for s in suite.scenarios)


@pytest.mark.parametrize("name, split", [("shift", "train"), ("generalization", "test")])
def test_shift_and_generalization_use_held_out_conditions(name, split):
    """Codevilla's 2x2 in suites: shift = training tracks x new conditions, generalization =
    new tracks x new conditions (test = new tracks x the training condition)."""
    from steerloop.sim.conditions import BUILTIN
    from steerloop.sim.track import split_seed

    suite = builtin_suite(name)
    conditions = [s.condition for s in suite.scenarios]
    assert "default" not in conditions
    assert set(conditions) == set(HELD_OUT_CONDITIONS) and {"dusk", "worn", "desert", "town-rain"} <= set(conditions)
    assert all(BUILTIN.split(c) == "held_out" for c in conditions)
    assert [s.track for s in suite.scenarios] == [split_seed(split, i) for i in range(TEST_TRACKS)]


def test_suite_file_conditions_accept_compositions_and_split_names(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"tracks": [200000], "conditions": ["forest.fog.cheap", "held_out"]}))
    conditions = [s.condition for s in load_suite_file(path).scenarios]
    assert conditions == ["forest.fog.cheap", *HELD_OUT_CONDITIONS]
    path.write_text(json.dumps({"tracks": [200000], "conditions": ["forest.fgo"]}))
    with pytest.raises(SuiteError, match=r"conditions\[0\] 'forest.fgo': unknown weather 'fgo' \(did you mean 'fog'\?\)"):
        load_suite_file(path)


def test_scenario_seeds_are_stable():
    for name in BUILTIN_SUITES:
        first = [s.seed for s in builtin_suite(name).scenarios]
        assert first == [s.seed for s in builtin_suite(name).scenarios]
        assert len(set(first)) == len(first), name
    assert scenario_seed("test", 3) == scenario_seed("test", 3)
    assert scenario_seed("test", 3) != scenario_seed("test", 4)
    assert scenario_seed("test", 0) != scenario_seed("smoke", 0)
    # pinned: a suite must mean the same thing on every machine and in every release
    assert scenario_seed("smoke", 0) == 281249795
    assert scenario_seed("test", 0) == 760930276
    assert builtin_suite("smoke").scenarios[0].seed == 281249795


def test_builtin_suites_are_equal_when_rebuilt():
    assert builtin_suite("recovery") == builtin_suite("recovery")
    assert builtin_suite("smoke").to_dict() == builtin_suite("smoke").to_dict()


def test_standard_perturbations_are_deterministic_and_alternate_sign():
    track = load_track(split_seed("test", 0))
    first = standard_perturbations(track, 10.0, 0)
    assert first == standard_perturbations(track, 10.0, 0)
    assert first and first[0].kind == "lateral_push" and first[0].magnitude > 0
    assert standard_perturbations(track, 10.0, 1)[0].magnitude < 0


def test_suite_to_dict_is_json_serialisable():
    for name in BUILTIN_SUITES:
        json.dumps(builtin_suite(name).to_dict())


def test_unknown_builtin_suite_name():
    with pytest.raises(ValueError, match="nosuch"):
        builtin_suite("nosuch")
    with pytest.raises(SuiteError, match="nosuch") as error:
        load_suite("nosuch")
    assert "smoke" in str(error.value)  # lists the built-in suites


# ----------------------------------------------------------------------------- user suites
def test_documented_user_suite_loads(suite_dir):
    path = write_suite(suite_dir, DOCUMENTED_SUITE)
    suite = load_suite(str(path))
    assert suite.name == "mine"
    assert len(suite.scenarios) == 2  # one per track x condition
    bend, proc = suite.scenarios
    assert isinstance(bend.track, dict) and bend.track["name"] == "s-bend"
    assert bend.track == load_track(str(SHIPPED_TRACKS / "s-bend.json")).to_spec()
    assert proc.track == 200001
    for i, scenario in enumerate(suite.scenarios):
        assert isinstance(scenario, Scenario)
        assert scenario.condition == "default"
        assert scenario.speed == 10.0
        assert scenario.interventions is False
        assert scenario.perturbations, "standard perturbations were asked for"
        assert scenario.seed == scenario_seed("mine", i)
        assert scenario.name.startswith(f"mine-{i:02d}-")
    assert suite.has_perturbations and not suite.has_interventions
    assert load_suite(str(path)) == suite  # deterministic


def test_user_suite_is_the_cross_product_of_tracks_and_conditions(suite_dir):
    spec = {**DOCUMENTED_SUITE, "conditions": ["default", "dusk", "worn"], "perturbations": "none"}
    suite = load_suite_file(write_suite(suite_dir, spec))
    assert len(suite.scenarios) == 6
    assert [s.condition for s in suite.scenarios] == ["default", "dusk", "worn"] * 2
    assert [s.track == 200001 for s in suite.scenarios] == [False] * 3 + [True] * 3
    assert len({s.name for s in suite.scenarios}) == 6
    assert len({s.seed for s in suite.scenarios}) == 6
    assert not suite.has_perturbations


def test_user_suite_defaults_and_explicit_perturbations(suite_dir):
    spec = {"tracks": [200002], "interventions": True,
            "perturbations": [{"kind": "lateral_push", "start_step": 40, "magnitude": -0.5, "duration": 25}]}
    suite = load_suite_file(write_suite(suite_dir, spec, "defaults.json"))
    assert suite.name == "defaults"  # the file's stem
    (scenario,) = suite.scenarios
    assert scenario.condition == "default" and scenario.speed == 10.0 and scenario.interventions is True
    assert scenario.perturbations == (Perturbation("lateral_push", 40, -0.5, 25),)


@pytest.mark.parametrize("spec,field", [
    ({"name": "x"}, "tracks"),
    ({"tracks": []}, "tracks"),
    ({"tracks": "200001"}, "tracks"),
    ({"tracks": [200001], "conditions": ["fog"]}, "conditions[0]"),
    ({"tracks": [200001], "conditions": ["default", "snow"]}, "conditions[1]"),
    ({"tracks": [200001], "conditions": []}, "conditions"),
    ({"tracks": [200001], "speed": 0}, "speed"),
    ({"tracks": [200001], "speed": "fast"}, "speed"),
    ({"tracks": [200001], "interventions": "yes"}, "interventions"),
    ({"tracks": [200001], "perturbations": "many"}, "perturbations"),
    ({"tracks": [200001], "perturbations": [{"kind": "lateral_push"}]}, "perturbations[0]"),
    ({"tracks": [200001], "perturbations": [{"kind": "wobble", "start_step": 5, "magnitude": 1, "duration": 3}]},
     "perturbations[0]"),
    ({"tracks": [200001, True]}, "tracks[1]"),
    ({"tracks": [200001, 1.5]}, "tracks[1]"),
    ([200001], "JSON object"),
])
def test_malformed_user_suite_names_file_and_field(suite_dir, spec, field):
    path = write_suite(suite_dir, spec, "bad-suite.json")
    with pytest.raises(SuiteError) as error:
        load_suite(str(path))
    message = str(error.value)
    assert str(path) in message, message
    assert field in message, message


def test_boolean_speed_is_refused(suite_dir):
    path = write_suite(suite_dir, {"tracks": [200001], "speed": True}, "boolspeed.json")
    with pytest.raises(SuiteError, match="speed"):
        load_suite(str(path))


def test_user_suite_with_bad_json(suite_dir):
    path = write_suite(suite_dir, '{"tracks": [200001],', "broken.json")
    with pytest.raises(SuiteError, match="not valid JSON") as error:
        load_suite(str(path))
    assert str(path) in str(error.value)


def test_user_suite_with_missing_track_file(suite_dir):
    path = write_suite(suite_dir, {"tracks": [200001, "tracks/no-such-track.json"]}, "missing.json")
    with pytest.raises(SuiteError) as error:
        load_suite(str(path))
    message = str(error.value)
    assert str(path) in message and "tracks[1]" in message and "no-such-track.json" in message


def test_user_suite_with_invalid_track_spec(suite_dir):
    (suite_dir / "tracks" / "bad.json").write_text('{"segments": [{"type": "spiral", "length": 10}]}')
    path = write_suite(suite_dir, {"tracks": ["tracks/bad.json"]}, "badtrack.json")
    with pytest.raises(SuiteError) as error:
        load_suite(str(path))
    assert "tracks[0]" in str(error.value) and "spiral" in str(error.value)


def test_missing_suite_file(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(SuiteError, match="does not exist") as error:
        load_suite(str(missing))
    assert str(missing) in str(error.value)
    assert isinstance(error.value, ValueError)  # the CLI catches ValueError
