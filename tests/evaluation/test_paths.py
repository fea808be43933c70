"""Names become paths: every user-chosen name that names a file or directory (suite, track,
scenario, study dataset and policy, condition) is refused unless safe, before anything is
written, and every write stays under its output directory (steerloop.paths)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from steerloop.evaluation.cli import main
from steerloop.evaluation.regress import PolicyEvaluator
from steerloop.evaluation.runner import RESULTS_SCHEMA_VERSION, evaluate
from steerloop.evaluation.study import Stage, load_study, plan_study
from steerloop.evaluation.suites import Scenario, Suite, SuiteError, load_suite, load_suite_file
from steerloop.paths import (MAX_NAME_LENGTH, NAME_MAX_BYTES, UnsafeNameError, UnsafePathError, is_safe_name,
                                 path_under, safe_name, shorten, slug)

from helpers import SHORT_SPEC

TINY = "16x32"
ABSOLUTE = "<abs>"  # stands for an absolute path inside the test's directory (its target is checked untouched)
HOSTILE = ["../../x", ABSOLUTE, "a/b", "", ".", "..", 5, ["x"]]
HOSTILE_STRINGS = [h for h in HOSTILE if isinstance(h, str)]  # TOML table names are always strings


def _value(value, root: Path):
    return str(root / "abs" / "target") if value == ABSOLUTE else value


def _tree(root: Path) -> list[str]:
    """Every path under ``root`` (files, directories, symlinks), relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line_exit_2(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ----------------------------------------------------------------------------- safe_name
@pytest.mark.parametrize("name", ["test", "a", "7", "my-suite_1.0", "proc-200000", "A" * MAX_NAME_LENGTH])
def test_safe_name_accepts_plain_names(name):
    assert safe_name(name, field="name", source="suite.json") == name
    assert is_safe_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "/tmp/abs", "a/b", "a\\b", ".hidden", "-x", "_x",
                                  "a..b", "a b", "a\nb", "a:b", "é", "A" * (MAX_NAME_LENGTH + 1), 5, 1.5, None,
                                  ["x"], {"a": 1}, b"x", True])
def test_safe_name_refuses_with_one_line_naming_field_file_and_value(name):
    with pytest.raises(UnsafeNameError) as caught:
        safe_name(name, field="'name'", source="dir/suite.json")
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message
    assert message.startswith("dir/suite.json: 'name' ")
    assert repr(name)[:40] in message
    assert "A-Z a-z 0-9 . _ -" in message
    assert not is_safe_name(name)


def test_a_long_refused_value_is_shortened_in_the_message():
    with pytest.raises(UnsafeNameError) as caught:
        safe_name("x/" * 500, field="name", source="s.json")
    assert len(str(caught.value)) < 300


# ----------------------------------------------------------------------------- slug and shorten
@pytest.mark.parametrize("value, expected", [
    ("expert", "expert"), ("zeros", "zeros"), ("runs/pilotnet/best", "pilotnet_best"),
    ("expert:pure_pursuit", "expert_pure_pursuit"), ("../../x", "x"), ("/tmp/abs", "tmp_abs"), ("", "policy"),
    (".", "policy"), ("..", "policy"), ("...", "policy"), ("a..b", "a_b"), ("runs/.hidden", "runs_.hidden")])
def test_slug_makes_safe_names_from_paths(value, expected):
    assert slug(value) == expected
    assert is_safe_name(slug(value))


def test_slug_keeps_the_end_of_long_names_within_the_limit():
    name = slug("/runs/" + "x" * 100 + "/.-_best", limit=20)
    assert is_safe_name(name) and len(name) <= 20 and name.endswith("best")


def test_shorten_leaves_short_names_and_keeps_long_ones_distinct():
    assert shorten("closed_loop-a@b-0123456789", 200) == "closed_loop-a@b-0123456789"
    a, b = shorten("x" * 300 + "a", 200), shorten("x" * 300 + "b", 200)
    assert a != b and len(a) <= 200 and len(b) <= 200 and a.startswith("x" * 100)
    assert len(shorten("é" * 300, 200).encode()) <= 200


# ----------------------------------------------------------------------------- path_under
def test_path_under_joins_without_resolving(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert path_under("out", "scenarios", "a.json") == Path("out/scenarios/a.json")
    assert path_under(tmp_path, "a", "b") == tmp_path / "a" / "b"
    assert path_under(tmp_path) == tmp_path


@pytest.mark.parametrize("parts", [("..", "x"), ("../../x",), ("a", "..", "..", "x"), ("/etc/passwd",),
                                   ("scenarios", "/tmp/abs.json")])
def test_path_under_refuses_paths_leaving_the_root(tmp_path, parts):
    with pytest.raises(UnsafePathError, match="outside the output directory"):
        path_under(tmp_path / "out", *parts)


def test_path_under_allows_dotdot_that_stays_inside(tmp_path):
    assert path_under(tmp_path, "a", "..", "b") == tmp_path / "a" / ".." / "b"


def test_path_under_refuses_a_symlinked_directory_leading_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scenarios").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="resolves to"):
        path_under(tmp_path / "out", "scenarios", "a.json")
    with pytest.raises(UnsafePathError):
        path_under(tmp_path / "out", "scenarios")


def test_path_under_refuses_a_dangling_symlink_leading_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UnsafePathError):
        path_under(tmp_path / "out", "results.json")


def test_path_under_allows_symlinks_that_stay_inside_and_a_symlinked_root(tmp_path):
    real = tmp_path / "real"
    (real / "data").mkdir(parents=True)
    (real / "link").symlink_to(real / "data")
    (tmp_path / "root").symlink_to(real)
    assert path_under(tmp_path / "root", "link", "a.json") == tmp_path / "root" / "link" / "a.json"


def test_path_under_refuses_a_component_too_long_for_the_file_system(tmp_path):
    with pytest.raises(UnsafePathError, match=f"longer than {NAME_MAX_BYTES} bytes"):
        path_under(tmp_path, "a" * (NAME_MAX_BYTES + 1))


# ----------------------------------------------------------------------------- suite files
def _suite_file(root: Path, name=None, track_name="short", conditions=("default",), filename="suite.json") -> Path:
    spec = dict(SHORT_SPEC, name=track_name)
    (root / "track.json").write_text(json.dumps(spec))
    suite = {"tracks": ["track.json"], "conditions": list(conditions), "track_length": 60.0}
    if name is not None:
        suite["name"] = name
    path = root / filename
    path.write_text(json.dumps(suite))
    return path


@pytest.fixture
def work(tmp_path) -> Path:
    """tmp_path/work: where the input files go; tmp_path/out is --out; tmp_path/abs the absolute target."""
    (tmp_path / "work").mkdir()
    return tmp_path


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_suite_name_is_refused_when_parsed(work, value):
    path = _suite_file(work / "work", name=_value(value, work))
    with pytest.raises(SuiteError, match=f"{path}: 'name' "):
        load_suite_file(path)


@pytest.mark.parametrize("value", ["../../x", "a/b", "", ".", "..", "a b"])
def test_hostile_track_name_is_refused_when_its_suite_is_parsed(work, value):
    path = _suite_file(work / "work", name="mine", track_name=value)
    with pytest.raises(SuiteError, match=r"tracks\[0\]: the track's name"):
        load_suite_file(path)


def test_a_suite_without_name_needs_a_safe_file_name(work):
    path = _suite_file(work / "work", filename="my suite.json")
    with pytest.raises(SuiteError, match="the file name"):
        load_suite_file(path)
    assert load_suite_file(_suite_file(work / "work", filename="mine.json")).name == "mine"


def test_a_scenario_name_too_long_is_refused_naming_it(work):
    path = _suite_file(work / "work", name="s" * 100, track_name="t" * 100)
    with pytest.raises(SuiteError, match="scenario name"):
        load_suite_file(path)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_condition_is_refused_when_parsed(work, value):
    path = _suite_file(work / "work", name="mine", conditions=[_value(value, work)])
    with pytest.raises(SuiteError, match=r"conditions\[0\]"):
        load_suite_file(path)


def test_evaluate_refuses_a_python_suite_with_hostile_scenario_names_before_writing(work):
    suite = Suite("mine", (Scenario(name="../../escaped", track=dict(SHORT_SPEC)),))
    before = _tree(work)
    with pytest.raises(SuiteError, match=r"scenarios\[0\].name '../../escaped'"):
        evaluate("zeros", suite, work / "out", resolution=(16, 32), progress=False)
    assert _tree(work) == before


def test_evaluate_refuses_duplicate_scenario_names(work):
    scenario = Scenario(name="same", track=dict(SHORT_SPEC))
    with pytest.raises(SuiteError, match="used twice"):
        evaluate("zeros", Suite("mine", (scenario, scenario)), work / "out", resolution=(16, 32), progress=False)
    assert not (work / "out").exists()


# ----------------------------------------------------------------------------- every writing command
def _evaluate(suite: Path, out: Path) -> list[str]:
    return ["evaluate", "--policy", "zeros", "--suite", str(suite), "--out", str(out), "--resolution", TINY,
            "--quiet"]


def _regress(suite: Path, out: Path) -> list[str]:
    return ["regress", "--policy", "zeros", "--baseline", "expert", "--suite", str(suite), "--out", str(out),
            "--resolution", TINY, "--quiet"]


def _dagger(suite: Path, out: Path) -> list[str]:
    return ["dagger", "--init", str(out.parent / "work" / "ckpt"), "--data", str(out.parent / "work" / "data"),
            "--suite", str(suite), "--out", str(out), "--quiet"]


def _study(suite: Path, out: Path) -> list[str]:
    study = suite.parent / "study.toml"
    study.write_text(STUDY.format(suite=suite.name, dataset="clean", policy="pilotnet"))
    return ["study", "--config", str(study), "--out", str(out), "--workers", "1", "--quiet"]


STUDY = """
[study]
resolution = [16, 32]
suites = ["{suite}"]
offline_data = "{dataset}"
[datasets."{dataset}"]
episodes = 1
track_length = 60.0
[policies."{policy}"]
model = "pilotnet"
data = ["{dataset}"]
"""

SUITE_COMMANDS = {"evaluate": _evaluate, "regress": _regress, "dagger": _dagger, "study": _study}


@pytest.mark.parametrize("command", sorted(SUITE_COMMANDS))
@pytest.mark.parametrize("value", HOSTILE)
def test_every_command_refuses_a_hostile_suite_name_before_writing(work, capsys, command, value):
    suite = _suite_file(work / "work", name=_value(value, work))
    argv = SUITE_COMMANDS[command](suite, work / "out")
    before = _tree(work)
    code = main(argv)
    _one_line_exit_2(capsys, code, f"steerloop {command}: ", "'name'", "cannot be used as a file name")
    assert _tree(work) == before  # nothing created: not --out, not its parent, not the absolute target


@pytest.mark.parametrize("command", sorted(SUITE_COMMANDS))
@pytest.mark.parametrize("value", ["../../x", "a/b", ".."])
def test_every_command_refuses_a_hostile_track_name_before_writing(work, capsys, command, value):
    suite = _suite_file(work / "work", name="mine", track_name=value)
    argv = SUITE_COMMANDS[command](suite, work / "out")
    before = _tree(work)
    _one_line_exit_2(capsys, main(argv), "the track's name")
    assert _tree(work) == before


@pytest.mark.parametrize("field", ["dataset", "policy"])
@pytest.mark.parametrize("value", HOSTILE_STRINGS)
def test_study_refuses_hostile_dataset_and_policy_names_before_writing(work, capsys, field, value):
    names = {"dataset": "clean", "policy": "pilotnet", field: json.dumps(_value(value, work))[1:-1]}
    study = work / "work" / "study.toml"
    study.write_text(STUDY.replace("{suite}", "smoke").format(**names))
    before = _tree(work)
    code = main(["study", "--config", str(study), "--out", str(work / "out"), "--workers", "1", "--quiet"])
    table = "datasets" if field == "dataset" else "policies"
    _one_line_exit_2(capsys, code, "steerloop study: ", f"[{table}.NAME] name", "cannot be used as a file name")
    assert _tree(work) == before


@pytest.mark.parametrize("text, needle", [("datasets = 5\n[policies.p]\nmodel = 'pilotnet'", "datasets must be"),
                                          ("[datasets]\nclean = 5\n[policies.p]\nmodel = 'pilotnet'",
                                           "datasets.clean must be a table"),
                                          ("[study]\nsuites = [5]\n[policies.p]\nmodel = 'pilotnet'",
                                           "is not a string")])
def test_study_refuses_non_table_names_with_one_line(work, capsys, text, needle):
    study = work / "work" / "study.toml"
    study.write_text(text)
    code = main(["study", "--config", str(study), "--out", str(work / "out"), "--quiet"])
    _one_line_exit_2(capsys, code, needle)
    assert not (work / "out").exists()


@pytest.mark.parametrize("argv, needle", [(["--suite", "../../x"], "--suite"), (["--conditions", "../../x"],
                                                                                 "--conditions")])
def test_record_refuses_hostile_split_and_condition_names(work, capsys, argv, needle):
    before = _tree(work)
    code = main(["record", "--out", str(work / "out"), "--episodes", "1", "--resolution", TINY, "--quiet", *argv])
    _one_line_exit_2(capsys, code, needle)
    assert _tree(work) == before


def test_regress_refuses_a_baseline_run_json_with_hostile_scenario_names(work, capsys):
    baseline = work / "work" / "baseline"
    baseline.mkdir()
    scenario = {"name": "../../escaped", "track": dict(SHORT_SPEC), "condition": "default", "speed": 10.0,
                "perturbations": [], "interventions": False, "seed": 0, "track_length": 60.0}
    (baseline / "run.json").write_text(json.dumps({"suite": {"name": "mine", "scenarios": [scenario]}}))
    (baseline / "results.json").write_text(json.dumps({
        "schema_version": RESULTS_SCHEMA_VERSION, "policy": {"name": "expert"}, "suite": "mine", "seeds": [0],
        "resolution": [16, 32], "aggregate": {},
        "scenarios": [{"name": "../../escaped", "track": "short", "condition": "default", "seed": 0, "metrics": {}}]}))
    before = _tree(work)
    code = main(["regress", "--policy", "zeros", "--baseline", str(baseline), "--out", str(work / "out"), "--quiet"])
    _one_line_exit_2(capsys, code, str(baseline / "run.json"), r"scenarios[0].name '../../escaped'")
    assert _tree(work) == before


# ----------------------------------------------------------------------------- symlinks and derived names
def test_evaluate_refuses_an_output_subdirectory_symlinked_out_before_any_work(work, capsys):
    outside = work / "outside"
    outside.mkdir()
    (work / "out").mkdir()
    (work / "out" / "trajectories").symlink_to(outside)
    suite = _suite_file(work / "work", name="mine")
    _one_line_exit_2(capsys, main(_evaluate(suite, work / "out")), "outside the output directory")
    assert _tree(outside) == []
    assert sorted(os.listdir(work / "out")) == ["trajectories"]  # nothing written, not even run.json


def test_study_refuses_a_stage_directory_symlinked_out_before_any_work(work, capsys):
    outside = work / "outside"
    outside.mkdir()
    (work / "out").mkdir()
    (work / "out" / "datasets").symlink_to(outside)
    study = work / "work" / "study.toml"
    study.write_text(STUDY.replace("{suite}", "smoke").format(dataset="clean", policy="pilotnet"))
    code = main(["study", "--config", str(study), "--out", str(work / "out"), "--quiet"])
    _one_line_exit_2(capsys, code, "outside the output directory")
    assert _tree(outside) == [] and sorted(os.listdir(work / "out")) == ["datasets"]


@pytest.mark.parametrize("policy", ["../../x", "/tmp/abs", "runs/a b/best", "..", "expert:pure_pursuit"])
def test_cache_directories_of_path_named_policies_stay_under_the_root(tmp_path, monkeypatch, policy):
    (tmp_path / "empty" / "cwd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "empty" / "cwd")  # "" and ".." name directories: their content is hashed
    if policy and not policy.startswith("expert"):
        Path(policy).mkdir(parents=True, exist_ok=True)  # a policy path must exist to be evaluated
    evaluator = PolicyEvaluator(tmp_path / "cache")
    directory = evaluator.run_dir(policy, load_suite("smoke"))
    assert directory.parent == tmp_path / "cache"
    assert is_safe_name(directory.name)


def test_an_empty_policy_is_refused_before_any_directory_is_named(tmp_path):
    from steerloop.agents.protocol import PolicyError

    with pytest.raises(PolicyError, match="unknown policy ''"):
        PolicyEvaluator(tmp_path / "cache").run_dir("", load_suite("smoke"))
    assert not (tmp_path / "cache").exists()


def test_study_stage_paths_and_markers_stay_under_out_and_fit_the_file_system(work):
    long = "p" * MAX_NAME_LENGTH
    study = work / "work" / "study.toml"
    (work / "work" / "suite.json").write_text(json.dumps({"name": "s" * 100, "tracks": [200000],
                                                          "track_length": 60.0}))
    study.write_text(STUDY.format(suite="suite.json", dataset="d" * MAX_NAME_LENGTH, policy=long))
    plan = plan_study(load_study(str(study)), work / "out")
    for stage in plan.stages:
        assert stage.out.resolve().is_relative_to((work / "out").resolve())
        assert len(stage.marker.encode()) <= NAME_MAX_BYTES and stage.marker.endswith(".json")
    markers = [s.marker for s in plan.stages]
    assert len(set(markers)) == len(markers)


def test_short_study_markers_are_unchanged_so_caches_stay_valid():
    stage = Stage("closed_loop", "pilotnet@test", "0123456789", Path("out"))
    assert stage.marker == "closed_loop-pilotnet@test-0123456789.json"
